"""Measurements shared by the benchmark scripts: bytes held for the backward, gradient error."""


class SavedBytes:
    """Pack hook: bytes of the storages autograd saves, each counted once."""

    def __init__(self, exclude=()):
        self.seen = {self._key(x) for x in exclude}
        self.bytes = 0

    @staticmethod
    def _key(x):
        try:
            s = x.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, ...)
            return id(x), x.numel() * x.element_size()
        return s.data_ptr(), s.nbytes()

    def pack(self, x):
        key = self._key(x)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += key[1]
        return x

    @staticmethod
    def unpack(x):
        return x


def rel_err(grads, ref):
    """Max over the tensor pairs of max|g - g_ref| / max|g_ref|, in double precision."""
    worst = 0.0
    for g, r in zip(grads, ref):
        g, r = g.double(), r.double()
        scale = float(r.abs().max())
        worst = max(worst, float((g - r).abs().max()) / (scale if scale > 0 else 1.0))
    return worst
