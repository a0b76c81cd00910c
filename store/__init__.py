"""The store contract: the zarr activation store (zarr_store), its integrity checks, the hook
vocabulary its source names use, and stage 2's reader (stream). The one package that knows zarr;
it imports nothing of stage 1 (cache/) or stage 2 (training/)."""
