"""Forward pre-hooks that hold each part of the model until its weights have landed.

While an overlapped restore (fill.py) is in flight, the module that owns a layer group (the embeddings, a
decoder layer, the final norm and head) makes the compute stream wait on that group's copy event before its
kernels are queued. The CPU does not block: it queues the whole forward at once, and the GPU runs layer k as soon
as layer k's bytes are in. Once the last group has been waited on, the hooks remove themselves, so that
ordinary forwards pay nothing.
"""
from __future__ import annotations

from torch import nn

from .fill import ArenaFill
from .layout import ArenaLayout


def group_owners(model: nn.Module, layout: ArenaLayout) -> list[tuple[nn.Module, str]]:
    """The outermost modules whose tensors all belong to one layer group, with that group."""
    group_of = {s.name: s.group for s in layout.slots}
    owners: list[tuple[nn.Module, str]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        groups = {group_of[f"{prefix}.{n}" if prefix else n]
                  for n, _ in module.named_parameters(recurse=True, remove_duplicate=False)
                  if (f"{prefix}.{n}" if prefix else n) in group_of}
        groups |= {group_of[f"{prefix}.{n}" if prefix else n]
                   for n, _ in module.named_buffers(recurse=True, remove_duplicate=False)
                   if (f"{prefix}.{n}" if prefix else n) in group_of}
        if len(groups) == 1:
            owners.append((module, groups.pop()))
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return owners


class LayerGate:
    def __init__(self, model: nn.Module, layout: ArenaLayout):
        self._owners = group_owners(model, layout)
        self._fill: ArenaFill | None = None
        self._handles = []
        self._waited: set[str] = set()

    def arm(self, fill: ArenaFill) -> None:
        """Hold every module of `fill`'s groups until its group's event; replaces any earlier fill."""
        self.disarm()
        self._fill, self._waited = fill, set()
        pending = set(fill.groups)
        for module, group in self._owners:
            if group in pending:
                self._handles.append(module.register_forward_pre_hook(self._hook(group)))

    def _hook(self, group: str):
        def wait_for_weights(module, args):
            fill = self._fill
            if fill is None:
                return
            fill.wait_group(group)
            self._waited.add(group)
            if self._waited.issuperset(fill.groups):  # the stream is now ordered after the whole copy
                self.disarm()
        return wait_for_weights

    @property
    def armed(self) -> bool:
        return self._fill is not None

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._fill = [], None
