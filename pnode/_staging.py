"""Moving states between PETSc's memory and the model's device.

PETSc from PyPI keeps Vecs in host memory. A model on a GPU then gets each state
through preallocated buffers: host Vec -> pinned host buffer -> device buffer on
the way in, device -> pinned host buffer -> Vec on the way out; one device transfer
in each direction per call and no allocation on the hot path (the tape, which must
own its inputs, is the one exception). Pinned memory makes the transfers DMA.

A CPU model in PETSc's precision needs none of this: its tensors are DLPack views
of the Vecs themselves (``Staging`` is then not used at all).
"""

import torch


class Staging:
    """Preallocated buffers for one state size, model dtype and device."""

    def __init__(self, n, petsc_dtype, dtype, device, transfer=None):
        pin = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.dtype = dtype
        # A CPU model of another precision needs a cast, not a transfer: no host buffers.
        # (``transfer=True`` forces the device path, so the tests run it on a CPU.)
        self.on_host = device.type == "cpu" if transfer is None else not transfer
        self.host_in = None if self.on_host else torch.empty(n, dtype=petsc_dtype, pin_memory=pin)
        self.host_out = None if self.on_host else torch.empty(n, dtype=petsc_dtype, pin_memory=pin)
        self.dev_in = torch.empty(n, dtype=dtype, device=device)
        self.path = "host cast" if self.on_host else "pinned host staging" if pin else "host staging"

    def to_model(self, flat, copy):
        """The Vec's values on the model's device; a fresh tensor when ``copy``."""
        if self.on_host:
            return flat.to(self.dtype) if copy else self.dev_in.copy_(flat)
        self.host_in.copy_(flat)
        if copy:
            return self.host_in.to(device=self.device, dtype=self.dtype, non_blocking=True)
        self.dev_in.copy_(self.host_in, non_blocking=True)
        return self.dev_in

    def to_petsc(self, value, out_flat, scale=1.0):
        """out_flat = scale * value, with value on the model's device."""
        src = value.reshape(-1)
        if not self.on_host:
            # Device-to-host into pinned memory synchronises with the model's stream, so
            # PETSc never reads a buffer a kernel is still writing.
            self.host_out.copy_(src)
            src = self.host_out
        if scale == 1.0:
            out_flat.copy_(src)
        else:  # cast and scale in one pass
            torch.mul(src, scale, out=out_flat)
