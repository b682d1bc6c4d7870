import pytest
import torch

from tachy.cache import BatchKVCache, KVCache


def filled(n: int) -> KVCache:
    cache = KVCache(num_layers=2, num_kv_heads=1, head_dim=2, capacity=4)
    cache.reserve(n)
    for layer in range(2):
        k = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, 2) + 100 * layer
        cache.write(layer, k, -k)
    cache.advance(n)
    return cache


def slots(cache: KVCache, layer: int = 0) -> list[float]:
    return cache.k[layer, 0, 0, :cache.length, 0].tolist()


def test_write_reads_back_and_grows_past_capacity():
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, capacity=2)
    cache.reserve(5)
    k, v = cache.write(0, torch.ones(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))
    cache.advance(5)
    assert cache.capacity >= 5 and k.shape == (1, 1, 5, 2) and cache.length == 5
    cache.reserve(10)      # growth keeps what was written
    assert cache.k[0, 0, 0, :5].eq(1).all()


def test_rollback_forgets_newest_slots():
    cache = filled(6)
    cache.rollback(2)
    assert slots(cache) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        cache.rollback(5)


def test_keep_compacts_a_tree_path_in_every_layer():
    cache = filled(8)
    cache.keep([4, 6, 7])
    assert slots(cache, 0) == [0, 1, 2, 3, 4, 6, 7]
    assert slots(cache, 1) == [100, 101, 102, 103, 104, 106, 107]
    assert cache.v[0, 0, 0, 5, 0].item() == -6


def test_keep_contiguous_prefix_is_a_rollback():
    cache = filled(8)
    cache.keep([5, 6])
    assert slots(cache) == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("bad", [[], [3, 3], [5, 4], [2, 9]])
def test_keep_rejects_bad_slots(bad):
    with pytest.raises(ValueError):
        filled(8).keep(bad)


def test_nbytes_counts_used_slots():
    cache = filled(3)
    assert cache.nbytes == 3 * 2 * 1 * 2 * 4 * 2   # slots * layers * heads * dim * fp32 * (k and v)


def test_batch_cache_entries_of_one_row_take_consecutive_slots():
    """A row listed n times in ``rows`` (a speculative row's root and draft) gets n consecutive slots from its
    length; attention groups each entry by its own slot's key bucket; the chain default lets an entry see its
    row up to itself, ``entry_mask`` only what it allows (and the row's committed slots)."""
    cache = BatchKVCache(2, 1, 4, capacity=128, batch=3)
    cache.lengths = [62, 0, 5]
    cache.rows = [0, 0, 0, 2, 2]
    cache.reserve(1)
    assert cache.slots() == [62, 63, 64, 5, 6]
    rows, slots, groups = cache.index()
    assert rows.tolist() == [0, 0, 0, 2, 2] and slots.tolist() == [62, 63, 64, 5, 6]
    assert [(keys, entries.tolist()) for keys, entries, _ in groups] == [(64, [0, 1, 3, 4]), (128, [2])]
    positions = torch.tensor([62, 63, 64, 5, 6])
    chain = cache.row_masks([None, 4], positions)
    assert chain[None][1, 0, 0, :65].tolist() == [True] * 64 + [False]           # slots 0..63
    assert chain[4][2, 0, 0].nonzero().flatten().tolist() == [61, 62, 63, 64]      # within 4 positions
    # row 0's draft as a tree: entries 1 and 2 both children of the root (positions 63, 63)
    cache.entry_mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0],
                                     [0, 0, 0, 1, 1]], dtype=torch.bool)
    tree = cache.row_masks([None, 4], torch.tensor([62, 63, 63, 5, 6]))
    assert tree[None][2, 0, 0].nonzero().flatten().tolist() == list(range(63)) + [64]   # not its sibling at 63
    assert tree[4][2, 0, 0].nonzero().flatten().tolist() == [60, 61, 62, 64]            # positions 60..63
    assert tree[None][4, 0, 0].nonzero().flatten().tolist() == list(range(7))
    cache.rows = [1] * 129
    with pytest.raises(ValueError, match="full"):
        cache.reserve(1)
