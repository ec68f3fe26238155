"""Cutting packed micro-batches into Ulysses pieces (``shard_packed``) and the row segments
(``row_segments``) each rank holds, on hand-built left-padded prompt / right-padded
response batches."""

from __future__ import annotations

import itertools

import pytest
import torch

from fipo_trainer.actor.micro_batch import pack_rows, unpack_to_rows
from fipo_trainer.actor.sequence_parallel import shard_packed
from fipo_trainer.algorithms.sequence_shards import SequenceShards, row_segments


def build_batch(prompt_lens: list[int], resp_lens: list[int], pw: int, rw: int):
    """input_ids [n, pw + rw] with unique ids per real token (0 = padding) and its mask."""
    n = len(prompt_lens)
    ids = torch.zeros(n, pw + rw, dtype=torch.long)
    attn = torch.zeros(n, pw + rw, dtype=torch.long)
    next_id = 1
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        for c in list(range(pw - p, pw)) + list(range(pw, pw + r)):
            ids[i, c] = next_id
            attn[i, c] = 1
            next_id += 1
    return ids, attn


# name -> (prompt lengths, response lengths, prompt width, response width)
PACKINGS = {
    # T = 3+3 + 4+0 + 1+5 + 2+2 = 20 (even); a row with no response.
    "mixed": ([3, 4, 1, 2], [3, 0, 5, 2], 4, 5),
    # T = 2+5 + 1+1 + 3+4 + 2+1 = 19 (odd); a response of length 1.
    "odd_total": ([2, 1, 3, 2], [5, 1, 4, 1], 3, 5),
    # T = 1: a sequence shorter than the group (one prompt token, no response).
    "one_token": ([1], [0], 2, 3),
    # T = 2: one prompt token and one response token.
    "two_tokens": ([1], [1], 2, 3),
    # T = 7 (odd), one row; k = 3 gives pieces of 3 and a pad of 2.
    "single_row_odd": ([3], [4], 3, 4),
}
SIZES = [2, 3]


def _packed(name):
    pl, rl, pw, rw = PACKINGS[name]
    ids, attn = build_batch(pl, rl, pw, rw)
    packed = pack_rows(ids, attn, pw)
    assert packed.num_tokens == sum(pl) + sum(rl)
    assert packed.response_lengths == rl
    return packed, rw


def _pieces(packed, size):
    return [shard_packed(packed, size, r) for r in range(size)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(PACKINGS))
def test_pieces_are_equal_and_reassemble_the_padded_sequence(name, size):
    packed, _ = _packed(name)
    pieces = _pieces(packed, size)
    total = packed.num_tokens
    piece = pieces[0].local.num_tokens
    assert piece == max(1, -(-total // size))
    assert all(p.local.num_tokens == piece for p in pieces)
    assert all(p.local.input_ids.shape == (1, piece) for p in pieces)
    assert all(p.local.position_ids.shape == (1, piece) for p in pieces)
    pad = piece * size - total
    assert 0 <= pad < max(size, piece)
    ids = torch.cat([p.local.input_ids for p in pieces], dim=1)
    pos = torch.cat([p.local.position_ids for p in pieces], dim=1)
    torch.testing.assert_close(ids[:, :total], packed.input_ids)
    assert torch.all(ids[:, total:] == 0)
    torch.testing.assert_close(pos[:, :total], packed.position_ids)
    # The pad is a separate dummy sequence: position ids restart at 0.
    torch.testing.assert_close(pos[0, total:], torch.arange(pad))
    for p in pieces:
        # Every rank gets the whole padded sequence's position ids (Ulysses attention).
        torch.testing.assert_close(p.local.sequence_position_ids, pos)
        assert p.local.response_lengths == []
        assert p.num_targets == packed.targets.shape[0]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(PACKINGS))
def test_response_tokens_split_into_contiguous_slices(name, size):
    packed, _ = _packed(name)
    pieces = _pieces(packed, size)
    k = int(packed.targets.shape[0])
    piece = pieces[0].local.num_tokens
    slices = pieces[0].token_slices
    assert len(slices) == size
    assert all(p.token_slices == slices for p in pieces)  # every rank knows every slice
    assert [p.rank for p in pieces] == list(range(size))
    assert slices[0][0] == 0 and slices[-1][1] == k
    for (_, hi), (lo, _) in itertools.pairwise(slices):
        assert hi == lo
    seen = torch.zeros(k, dtype=torch.long)
    for r, p in enumerate(pieces):
        lo, hi = slices[r]
        assert lo <= hi
        seen[lo:hi] += 1
        local_pos = p.local.logit_positions
        assert local_pos.shape == (hi - lo,)
        # Each rank computes logits only inside its own piece ...
        assert torch.all((local_pos >= 0) & (local_pos < piece))
        # ... at exactly the global logit positions of its slice.
        torch.testing.assert_close(local_pos + r * piece, packed.logit_positions[lo:hi])
        torch.testing.assert_close(p.local.targets, packed.targets[lo:hi])
        # The logit at global position g predicts packed token g + 1.
        g = local_pos + r * piece
        torch.testing.assert_close(packed.input_ids[0, g + 1], p.local.targets)
    assert torch.all(seen == 1)
    # A response token belongs to the rank whose piece holds its predicting position.
    owner = packed.logit_positions // piece
    for r, (lo, hi) in enumerate(slices):
        assert torch.all(owner[lo:hi] == r)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(PACKINGS))
def test_place_puts_values_at_the_slice_and_keeps_gradients(name, size):
    packed, _ = _packed(name)
    k = int(packed.targets.shape[0])
    for p in _pieces(packed, size):
        lo, hi = p.token_slices[p.rank]
        values = (torch.arange(hi - lo, dtype=torch.float64) + 1.5).requires_grad_(True)
        placed = p.place(values)
        assert placed.shape == (k,)
        torch.testing.assert_close(placed[lo:hi], values.detach())
        assert torch.all(placed[:lo] == 0) and torch.all(placed[hi:] == 0)
        weights = torch.arange(k, dtype=torch.float64) + 2.0
        (placed * weights).sum().backward()
        torch.testing.assert_close(values.grad, weights[lo:hi])


def test_shorter_than_group_gives_one_token_pieces_and_empty_slices():
    packed, _ = _packed("one_token")
    for size in (2, 3):
        pieces = _pieces(packed, size)
        assert [p.local.num_tokens for p in pieces] == [1] * size
        assert [p.token_slices[p.rank] for p in pieces] == [(0, 0)] * size
        assert pieces[0].local.input_ids.tolist() == [[1]]
        assert all(p.local.input_ids.tolist() == [[0]] for p in pieces[1:])
        assert pieces[0].local.sequence_position_ids.tolist() == [[0, *range(size - 1)]]
        assert pieces[0].place(torch.zeros(0)).shape == (0,)


def test_two_tokens_in_a_group_of_three():
    packed, _ = _packed("two_tokens")  # prompt token at 0 predicts the response token at 1
    pieces = _pieces(packed, 3)
    assert [p.token_slices[p.rank] for p in pieces] == [(0, 1), (1, 1), (1, 1)]
    assert pieces[0].local.logit_positions.tolist() == [0]
    assert pieces[1].local.input_ids.tolist() == [[2]]  # the response token itself
    assert pieces[0].local.sequence_position_ids.tolist() == [[0, 1, 0]]


def test_odd_total_length_pads_one_token():
    packed, _ = _packed("odd_total")
    assert packed.num_tokens == 19
    pieces = _pieces(packed, 2)
    assert [p.local.num_tokens for p in pieces] == [10, 10]
    assert pieces[1].local.input_ids[0, -1].item() == 0
    assert pieces[1].local.position_ids[0, -1].item() == 0


@pytest.mark.parametrize("rank", [-1, 2])
def test_rank_outside_group_is_refused(rank):
    packed, _ = _packed("mixed")
    with pytest.raises(ValueError, match="sequence-parallel group of 2"):
        shard_packed(packed, 2, rank)


# ----------------------------------------------------------------------------- row segments


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(PACKINGS))
def test_row_segments_cover_each_response_once(name, size):
    packed, width = _packed(name)
    lengths = packed.response_lengths
    pieces = _pieces(packed, size)
    slices = pieces[0].token_slices
    starts, ends = row_segments(lengths, slices)
    assert starts.shape == ends.shape == (size, len(lengths))
    lens = torch.tensor(lengths)
    # Contiguous, consecutive across ranks, from column 0 to the response's end.
    assert torch.all(starts <= ends)
    assert torch.all(starts >= 0) and torch.all(ends <= lens)
    assert torch.all(starts[0] == 0) and torch.all(ends[-1] == lens)
    assert torch.all(starts[1:] == ends[:-1])
    torch.testing.assert_close((ends - starts).sum(0), lens)

    # Brute force: packed response token j (row i, column c) is owned by the rank whose
    # slice holds j.
    expected = torch.zeros(size, len(lengths), width, dtype=torch.bool)
    j = 0
    for i, n in enumerate(lengths):
        for c in range(n):
            rank = next(r for r, (lo, hi) in enumerate(slices) if lo <= j < hi)
            expected[rank, i, c] = True
            j += 1
    total = torch.zeros(len(lengths), width, dtype=torch.long)
    for r in range(size):
        owned = SequenceShards(r, starts, ends, lambda x: x[None]).owned(width)
        torch.testing.assert_close(owned, expected[r])
        total += owned.long()
    cols = torch.arange(width)[None, :]
    torch.testing.assert_close(total, (cols < lens[:, None]).long())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(PACKINGS))
def test_placed_log_probs_unpack_onto_owned_columns(name, size):
    """What ``PolicyTrainer.forward_rows`` builds: place + unpack = full rows x owned."""
    packed, width = _packed(name)
    lengths = packed.response_lengths
    k = int(packed.targets.shape[0])
    values = torch.arange(k, dtype=torch.float64) + 1.0
    full_rows = unpack_to_rows(values, lengths, width)
    pieces = _pieces(packed, size)
    starts, ends = row_segments(lengths, pieces[0].token_slices)
    total = torch.zeros_like(full_rows)
    for p in pieces:
        lo, hi = p.token_slices[p.rank]
        rows = unpack_to_rows(p.place(values[lo:hi]), lengths, width)
        owned = SequenceShards(p.rank, starts, ends, lambda x: x[None]).owned(width)
        torch.testing.assert_close(rows, full_rows * owned)
        total += rows
    torch.testing.assert_close(total, full_rows)
