"""func's module buffers across one call: what its forward wrote, and what its backward may see.

A backward that evaluates func again (``memory="states"``, a checkpoint budget, a
forward recomputed because another call came in between) must evaluate the func
the forward did, and must not count as calls of func a second time.
"""

import contextlib

from torch import nn


def buffer_owners(func):
    """func's modules, those of bound methods too (m.dynamics): whose buffers and parameters it reads."""
    owners = []
    for f in func if isinstance(func, (tuple, list)) else (func,):
        module = f if isinstance(f, nn.Module) else getattr(f, "__self__", None)
        if isinstance(module, nn.Module) and all(module is not m for m in owners):
            owners.append(module)
    return owners


def _written(before, buffer):
    """Whether the forward wrote ``buffer``, given (tensor, version) of its name before, or None.

    One made during the forward and left alone (a lazily registered constant) was not:
    the backward's evaluations see what the forward's saw after making it.
    """
    if before is None:
        return buffer._version != 0
    return before[0] is not buffer or before[1] != buffer._version


class Buffers:
    """The buffers of func's modules as one call's forward left them."""

    def __init__(self, roots):
        self.roots = roots   # func's modules (buffer_owners)
        self._take()
        self._written = ()

    def _take(self):
        self._modules = [m for root in self.roots for m in root.modules()]
        self._entries = self._now()
        self._versions = [b._version for _, _, b in self._entries]

    def _now(self):
        return [(m, name, b) for m in self._modules for name, b in m.named_buffers(recurse=False)]

    @contextlib.contextmanager
    def forward(self):
        """Around the forward: note the modules whose calls wrote a buffer (a BatchNorm in training)."""
        before = {(id(m), name): (b, b._version) for m, name, b in self._entries}
        yield
        # After the forward: what it made (a buffer registered at the first call, a statistic
        # assigned anew) is what the backward compares with, not a change since.
        self._take()
        touched = {id(m) for m, name, b in self._entries if _written(before.get((id(m), name)), b)}
        # Not a buffer that needs a gradient (an adjoint_params entry kept as a buffer): a copy of
        # it, made under the backward's no_grad, would cut f off from it (its gradient was 0).
        self._written = [(m, name, b) for m, name, b in self._entries if id(m) in touched and not b.requires_grad]

    def changed(self):
        """What was edited or replaced in func's modules since the forward, or None.

        The backward that evaluates func again would use it: a running_var assigned anew
        (an eval-mode BatchNorm) gave a gradient 77% off the forward's, without a word.
        Checked here rather than by saving the buffers for autograd, which made every
        backward fail on any edit of any buffer of the model func is a method of.
        """
        tree = [m for root in self.roots for m in root.modules()]
        now = self._now()
        if len(tree) != len(self._modules) or any(a is not b for a, b in zip(tree, self._modules)) or \
                len(now) != len(self._entries) or any(
                    a[0] is not b[0] or a[1] != b[1] or a[2] is not b[2] for a, b in zip(now, self._entries)):
            return "a buffer was assigned anew, or a submodule replaced"
        for (_, name, b), version in zip(self._entries, self._versions):
            if b._version != version:
                return f"buffer {name!r} was modified by an inplace operation"
        return None

    def read_back(self):
        """Buffers the forward wrote that func's output may depend on: [module.name], else [].

        The backward's evaluations see them as the forward left them, not as each of the
        forward's did (spectral_norm's power iteration: gradients 1.9% off). Normalisation
        layers' running statistics are the exception: in training, where they are written,
        the output uses the batch's statistics instead.
        """
        return [f"{type(m).__name__}.{name}" for m, name, _ in self._written
                if not isinstance(m, nn.modules.batchnorm._NormBase)]

    @contextlib.contextmanager
    def aside(self):
        """While the backward evaluates func again, the buffers the forward wrote are copies.

        A BatchNorm in training mode updates its running statistics on every call: each
        evaluation of the backward updated them once more, so after a training step they
        depended on the memory mode (rk4, 10 steps: 40 updates with 'graphs', 80 with
        'states', 160 with checkpoints=2). The module's own buffers stay as the forward
        left them. Only those: every buffer copied was a 69 MB constant grid held twice by
        every recomputing backward.
        """
        swapped = []
        try:
            for module, name, buffer in self._written:
                setattr(module, name, buffer.clone())
                swapped.append((module, name, buffer))
            yield
        finally:
            for module, name, buffer in reversed(swapped):
                setattr(module, name, buffer)
