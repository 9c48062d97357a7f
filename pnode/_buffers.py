"""func's module buffers across one call: what its forward wrote, and what its backward may see.

A backward that evaluates func again (``memory="states"``, a checkpoint budget, a
forward recomputed because another call came in between) must evaluate the func
the forward did, and must not count as calls of func a second time.
"""

import contextlib

from torch import nn


def buffer_owners(func):
    """The modules whose buffers func reads: func's own, and those of bound methods (m.dynamics)."""
    owners = []
    for f in func if isinstance(func, (tuple, list)) else (func,):
        module = f if isinstance(f, nn.Module) else getattr(f, "__self__", None)
        if isinstance(module, nn.Module) and all(module is not m for m in owners):
            owners.append(module)
    return owners


class Buffers:
    """The buffers of func's modules as one call's forward found them."""

    def __init__(self, roots):
        self._roots = roots
        self._modules = self._tree()
        self._entries = self._now()
        # Saved for autograd's version check, as the parameters are: an edit between the forward and
        # a backward that evaluates func again (a running statistic, a mask) silently changed func.
        self.saved = [b for _, _, b in self._entries if b.is_floating_point()]
        self._written = ()

    def _tree(self):
        return [m for root in self._roots for m in root.modules()]

    def _now(self):
        return [(m, name, b) for m in self._modules for name, b in m.named_buffers(recurse=False)]

    @contextlib.contextmanager
    def forward(self):
        """Around the forward: note the modules whose calls wrote a buffer (a BatchNorm in training)."""
        before = [b._version for _, _, b in self._entries]
        yield
        touched = {id(m) for (m, _, b), v in zip(self._entries, before) if b._version != v}
        # Not a buffer that needs a gradient (an adjoint_params entry kept as a buffer): a copy of
        # it, made under the backward's no_grad, would cut f off from it (its gradient was 0).
        self._written = [(m, name, b) for m, name, b in self._entries if id(m) in touched and not b.requires_grad]

    def changed(self):
        """Whether a buffer or a submodule of func was replaced since the forward.

        Edits in place are autograd's version check; a buffer assigned anew or a submodule
        replaced (an eval-mode BatchNorm's statistics) is not, and the backward evaluated
        the new one: the gradient came out 77% off the forward's, without a word.
        """
        tree = self._tree()
        if len(tree) != len(self._modules) or any(a is not b for a, b in zip(tree, self._modules)):
            return True
        now = self._now()
        return len(now) != len(self._entries) or any(
            a[0] is not b[0] or a[1] != b[1] or a[2] is not b[2] for a, b in zip(now, self._entries))

    @contextlib.contextmanager
    def aside(self):
        """While the backward evaluates func again, the buffers the forward wrote are copies.

        A BatchNorm in training mode updates its running statistics on every call: each
        evaluation of the backward updated them once more, so after a training step they
        depended on the memory mode (rk4, 10 steps: 40 updates with 'graphs', 80 with
        'states', 160 with checkpoints=2). f sees the same values; the module's own
        buffers stay as the forward left them. Only those: every buffer copied was a
        69 MB constant grid held twice by every recomputing backward.
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
