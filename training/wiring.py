"""What each member of a sweep reads and writes, from the flags and the store's metadata.

    SAE            --source S (or the store's only source)       reads S, reconstructs S
    crosscoder     --sources A B …                               reads and reconstructs A, B, … side by side
    transcoder     --sources A --targets B                       reads A, reconstructs B
    per-layer SAEs --kind attn_out --layers all                  per layer L: an SAE on L's source of that kind
    MLP transcoder --transcoder --layers 3 (or all)              per layer L: reads L's MLP input, writes its output
    cross-layer    --clt --layers all (--arch clt)               one member reading every layer's MLP input and
                                                                 writing the MLP outputs of that layer and later ones
A sweep's grid of knobs is trained for every wiring (so `--transcoder --layers all --sweep k=16,32`
trains a transcoder per layer and k, all in one ensemble). The store says which sources are MLP
inputs and outputs: each source records its layer and kind (store/hooks.py HOOK_KINDS);
`mlp_in_normalized` (what the MLP reads after its norm) is preferred as the input, then `mlp_in`.
"""
from __future__ import annotations

from dataclasses import dataclass

from store.hooks import parse_layers
from store.zarr_store import ActivationStore, SourceInfo, StoreError
from training.members import ARCHS

INPUT_KINDS = ("mlp_in_normalized", "mlp_in")  # an MLP's input, in order of preference
TARGET_KIND = "mlp_out"


@dataclass(frozen=True)
class Wiring:
    """The sources one member reads and writes (names in the store)."""

    inputs: tuple[str, ...]
    targets: tuple[str, ...] = ()  # () : it reconstructs its inputs
    cross_layer: bool = False
    label: str = ""  # prefix of member names, e.g. "L03" for the layer-3 transcoder

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.inputs, *self.targets)))


def plan_wirings(store: ActivationStore, *, source: str | None, sources: tuple[str, ...], targets: tuple[str, ...],
                 transcoder: bool, clt: bool, layers: tuple, arch: str, kind: str | None = None) -> list[Wiring]:
    """The wirings a sweep trains, checked against the store."""
    if kind is not None:
        if transcoder or clt or source or sources or targets:
            raise ValueError("--kind trains an SAE per layer on that kind: give --layers, not other wiring flags")
        if not layers:
            raise ValueError("--kind needs --layers (numbers, or all)")
        return [Wiring((_of_kind(store, layer, kind).name,), label=f"L{layer:02d}") for layer in _store_layers(store, layers)]
    if transcoder or clt:
        if source or sources or targets:
            raise ValueError("--transcoder/--clt find their sources by layer: give --layers, not --source/--sources/--targets")
        if not layers:
            raise ValueError("--transcoder/--clt need --layers (numbers, or all)")
        pairs = [_mlp_pair(store, layer) for layer in _store_layers(store, layers)]
        if clt:
            _check_consecutive([layer for layer, _, _ in pairs])
            return [Wiring(tuple(i.name for _, i, _ in pairs), tuple(o.name for _, _, o in pairs), cross_layer=True)]
        return [Wiring((i.name,), (o.name,), label=f"L{layer:02d}") for layer, i, o in pairs]
    if layers:
        raise ValueError("--layers chooses the layers of --kind, --transcoder or --clt; otherwise name --source/--sources")
    names = [store.source(n).name for n in sources] if sources else [store.source(source).name] if source else []
    if targets:
        if not names:
            raise ValueError("--targets needs --sources (what the transcoder reads)")
        outs = [store.source(n).name for n in targets]
        if len(names) != 1 or len(outs) != 1:
            raise ValueError("a transcoder reads one source and writes one target (several layers: --clt --layers …)")
        return [Wiring(tuple(names), tuple(outs))]
    if not names:
        names = _default_sources(store, arch)
    return [Wiring(tuple(names))]


def _default_sources(store: ActivationStore, arch: str) -> list[str]:
    """The store's only source; a crosscoder reads every source of the store (of one width)."""
    names = [s.name for s in store.sources]
    if ARCHS[arch].reads_every_source and len(names) > 1:
        widths = {s.name: s.d for s in store.sources}
        if len(set(widths.values())) > 1:
            raise StoreError(f"store {store.path} holds sources of several widths {widths}: "
                             "choose the crosscoder's with --sources")
        print(f"crosscoder over all {len(names)} sources of the store: {', '.join(names)}")
        return names
    if len(names) > 1:
        raise StoreError(f"store {store.path} holds several sources; choose one with --source: {', '.join(names)}")
    return names


def _store_layers(store: ActivationStore, layers: tuple) -> list[int]:
    """`--layers` against the layers the store's first model has (n_layers in its info)."""
    n_layers = store.info.get("n_layers")
    if n_layers is None:
        raise StoreError(f"store {store.path} does not record its model's number of layers")
    return parse_layers(tuple(layers), n_layers)


def _of_kind(store: ActivationStore, layer: int, kind: str) -> SourceInfo:
    """The store's (first model's) source of `kind` at `layer`."""
    for s in store.sources:
        if s.layer == layer and s.kind == kind and "/" not in s.name:
            return s
    held = ", ".join(s.name for s in store.sources if s.layer == layer) or "nothing"
    raise StoreError(f"store {store.path} has no {kind} at layer {layer} (it holds {held} there): "
                     f"cache it with generate_activations.py --layers … --hook {kind}")


def _mlp_pair(store: ActivationStore, layer: int) -> tuple[int, SourceInfo, SourceInfo]:
    """(layer, the MLP's input source, its output source) of one layer of the store."""
    here = [s for s in store.sources if s.layer == layer and "/" not in s.name]
    by_kind = {s.kind: s for s in here}
    inp = next((by_kind[k] for k in INPUT_KINDS if k in by_kind), None)
    out = by_kind.get(TARGET_KIND)
    if inp is None or out is None:
        missing = "input (mlp_in_normalized or mlp_in)" if inp is None else "output (mlp_out)"
        held = ", ".join(s.name for s in here) or "nothing"
        raise StoreError(f"store {store.path} has no MLP {missing} at layer {layer} (it holds {held} there): "
                         "cache it with generate_activations.py --layers … --hook mlp_in_normalized mlp_out")
    return layer, inp, out


def _check_consecutive(layers: list[int]) -> None:
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"a cross-layer transcoder needs consecutive layers; got {', '.join(map(str, layers))}")
