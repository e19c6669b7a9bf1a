"""Alignment masks of a bad trajectory vs its repair (dfgen/align.py).

Property tests check the contract on random pairs against a slow reference built from rapidfuzz's
opcodes (the fast code walks editops instead); golden cases are checked by hand.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein

from dfgen.align import Alignment, align, apply_opcodes, first_edit_position, step_ids, step_mask

# Small alphabets make repeated tokens and ambiguous alignments common.
tokens = st.lists(st.integers(0, 4), max_size=30)
wide_tokens = st.lists(st.integers(0, 200_000), max_size=60)


@st.composite
def edited_pair(draw):
    """A bad sequence and a repair made from it by random substitutions, deletions and insertions."""
    bad = draw(st.lists(st.integers(0, 6), max_size=40))
    rep = []
    for tok in bad:
        op = draw(st.sampled_from(["keep"] * 6 + ["sub", "del", "ins"]))
        if op == "keep":
            rep.append(tok)
        elif op == "sub":
            rep.append(draw(st.integers(0, 6)))
        elif op == "ins":
            rep += [tok, draw(st.integers(0, 6))]
    rep += draw(st.lists(st.integers(0, 6), max_size=3))
    return bad, rep


pairs = st.one_of(st.tuples(tokens, tokens), st.tuples(wide_tokens, wide_tokens), edited_pair())


def reference_masks(bad, rep, anchor=True):
    """Slow reference: hunks = runs of non-equal rapidfuzz opcodes, filled range by range."""
    hunks, cur = [], None
    for tag, i1, i2, j1, j2 in Levenshtein.opcodes(bad, rep).as_list():
        if tag == "equal":
            if cur:
                hunks.append(cur)
            cur = None
        else:
            cur = [cur[0], i2, cur[2], j2] if cur else [i1, i2, j1, j2]
    if cur:
        hunks.append(cur)

    def fill(mask, lo, hi):
        for t in range(lo, hi):
            mask[t] = 1
        if lo == hi and anchor and mask:
            mask[min(lo, len(mask) - 1)] = 1

    mb, mr, rb, rr = [0] * len(bad), [0] * len(rep), [0] * len(bad), [0] * len(rep)
    for i1, i2, j1, j2 in hunks:
        fill(mb, i1, i2)
        fill(mr, j1, j2)
    if hunks:
        fill(rb, hunks[0][0], hunks[0][1])
        fill(rr, hunks[0][2], hunks[0][3])
    return mb, mr, rb, rr


def levenshtein_dp(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def common_prefix(a, b):
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    return p


# ---------------------------------------------------------------- properties


@given(pairs)
def test_mask_lengths_equal_trajectory_lengths_and_values_are_binary(pair):
    bad, rep = pair
    a = align(bad, rep)
    assert len(a.mask_bad) == len(a.root_bad) == len(bad)
    assert len(a.mask_repaired) == len(a.root_repaired) == len(rep)
    for mask in (a.mask_bad, a.mask_repaired, a.root_bad, a.root_repaired):
        assert set(mask) <= {0, 1}


@given(st.one_of(tokens, wide_tokens))
def test_identical_sequences_give_all_zero_masks(seq):
    a = align(seq, list(seq))
    assert a.mask_bad == a.root_bad == [0] * len(seq)
    assert a.mask_repaired == a.root_repaired == [0] * len(seq)
    assert a.distance == 0 and a.edit_ratio == 0.0 and a.editops == []


@given(pairs)
def test_apply_opcodes_rebuilds_the_repair(pair):
    bad, rep = pair
    a = align(bad, rep)
    assert apply_opcodes(bad, rep, a.opcodes) == rep
    assert a.opcodes == Levenshtein.opcodes(bad, rep).as_list()


@given(st.lists(st.integers(0, 50), min_size=1, max_size=40), st.data())
def test_single_substitution_marks_exactly_that_token_on_both_sides(bad, data):
    k = data.draw(st.integers(0, len(bad) - 1))
    new = data.draw(st.integers(0, 50).filter(lambda t: t != bad[k]))
    rep = bad[:k] + [new] + bad[k + 1 :]
    a = align(bad, rep)
    onehot = [int(t == k) for t in range(len(bad))]
    assert a.mask_bad == a.mask_repaired == onehot
    assert a.root_bad == a.root_repaired == onehot
    assert a.distance == 1 and a.opcodes[[op[0] for op in a.opcodes].index("replace")][1:] == (k, k + 1, k, k + 1)


@given(pairs)
def test_root_masks_are_inside_the_masks(pair):
    a = align(*pair)
    assert all(r <= m for r, m in zip(a.root_bad, a.mask_bad))
    assert all(r <= m for r, m in zip(a.root_repaired, a.mask_repaired))


@given(pairs, st.booleans())
def test_masks_match_slow_reference_from_opcodes(pair, anchor):
    bad, rep = pair
    a = align(bad, rep, anchor=anchor)
    assert (a.mask_bad, a.mask_repaired, a.root_bad, a.root_repaired) == reference_masks(bad, rep, anchor)


@given(pairs)
def test_without_anchor_masks_are_exactly_the_edited_tokens(pair):
    bad, rep = pair
    a = align(bad, rep, anchor=False)
    edited_bad, edited_rep = [0] * len(bad), [0] * len(rep)
    for tag, i, j in a.editops:
        if tag in ("replace", "delete"):
            edited_bad[i] = 1
        if tag in ("replace", "insert"):
            edited_rep[j] = 1
    assert a.mask_bad == edited_bad and a.mask_repaired == edited_rep


@given(pairs)
def test_first_mark_is_the_first_divergence_and_failed_rollouts_are_always_blamed(pair):
    bad, rep = pair
    a = align(bad, rep)
    if bad == rep:
        assert first_edit_position(a.mask_bad) is None
        return
    p = common_prefix(bad, rep)
    if bad:
        assert first_edit_position(a.mask_bad) == first_edit_position(a.root_bad) == min(p, len(bad) - 1)
    if rep:
        assert first_edit_position(a.mask_repaired) == min(p, len(rep) - 1)


@settings(max_examples=60)
@given(st.tuples(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12)))
def test_distance_is_the_levenshtein_distance(pair):
    bad, rep = pair
    a = align(bad, rep)
    assert a.distance == levenshtein_dp(bad, rep) == len(a.editops)
    assert a.edit_ratio == a.distance / max(len(bad), 1)


piece = st.sampled_from(["a", "1", " 2", "\n", " = ", "Step", " Step", " 3", ":", "x\n", "\n\n", "", ". "])


@given(st.lists(piece, max_size=40), st.data())
def test_step_masks_cover_token_masks_and_are_constant_within_a_step(texts, data):
    steps = step_ids(texts)
    assert len(steps) == len(texts)
    assert steps == sorted(steps) and (not steps or (steps[0] == 0 and set(steps) == set(range(steps[-1] + 1))))
    mask = data.draw(st.lists(st.integers(0, 1), min_size=len(texts), max_size=len(texts)))
    smask = step_mask(mask, steps)
    assert len(smask) == len(mask) and all(s >= m for s, m in zip(smask, mask))
    for t in range(1, len(steps)):
        if steps[t] == steps[t - 1]:
            assert smask[t] == smask[t - 1]
    for t, s in enumerate(steps):  # a step is marked only if one of its tokens is
        assert smask[t] == int(any(m for m, s2 in zip(mask, steps) if s2 == s))


@given(st.lists(piece, min_size=1, max_size=40))
def test_a_step_starts_right_after_each_inner_newline(texts):
    steps = step_ids(texts)
    for t in range(1, len(texts)):
        if "\n" in texts[t - 1] and texts[t]:
            assert steps[t] == steps[t - 1] + 1


# ---------------------------------------------------------------- golden cases (checked by hand)


def masks(bad, rep, **kw):
    a = align(bad, rep, **kw)
    return a.mask_bad, a.mask_repaired, a.root_bad, a.root_repaired


def test_substitution_marks_one_token_each_side():
    a = align([1, 2, 3, 4], [1, 2, 9, 4])
    assert (a.mask_bad, a.mask_repaired) == ([0, 0, 1, 0], [0, 0, 1, 0])
    assert (a.root_bad, a.root_repaired) == ([0, 0, 1, 0], [0, 0, 1, 0])
    assert a.opcodes == [("equal", 0, 2, 0, 2), ("replace", 2, 3, 2, 3), ("equal", 3, 4, 3, 4)]
    assert a.distance == 1 and a.edit_ratio == 0.25


def test_insertion_only_blames_the_bad_token_at_the_insertion_point():
    # rep inserts 7 before bad[1]: the policy wrote 2 where 7 was due, so bad token 1 is marked.
    assert masks([1, 2, 3], [1, 7, 2, 3]) == ([0, 1, 0], [0, 1, 0, 0], [0, 1, 0], [0, 1, 0, 0])
    assert masks([1, 2, 3], [1, 7, 2, 3], anchor=False) == ([0, 0, 0], [0, 1, 0, 0], [0, 0, 0], [0, 1, 0, 0])
    # at the start and at the end (the policy stopped too early: its last token is blamed)
    assert masks([1, 2, 3], [0, 1, 2, 3]) == ([1, 0, 0], [1, 0, 0, 0], [1, 0, 0], [1, 0, 0, 0])
    assert masks([1, 2, 3], [1, 2, 3, 4, 5]) == ([0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 1], [0, 0, 0, 1, 1])


def test_deletion_only_marks_the_deleted_tokens_and_anchors_the_repair():
    assert masks([1, 2, 8, 9, 3], [1, 2, 3]) == ([0, 0, 1, 1, 0], [0, 0, 1], [0, 0, 1, 1, 0], [0, 0, 1])
    assert masks([1, 2, 8, 9, 3], [1, 2, 3], anchor=False) == ([0, 0, 1, 1, 0], [0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0])
    assert masks([1, 2, 3, 4], [1, 2]) == ([0, 0, 1, 1], [0, 1], [0, 0, 1, 1], [0, 1])


def test_edits_at_both_ends_root_is_the_first():
    a = align([1, 2, 3, 4], [9, 2, 3, 8])
    assert (a.mask_bad, a.mask_repaired) == ([1, 0, 0, 1], [1, 0, 0, 1])
    assert (a.root_bad, a.root_repaired) == ([1, 0, 0, 0], [1, 0, 0, 0])
    a = align([0, 1, 2, 3], [1, 2, 3, 4])  # delete at the start, insert at the end
    assert (a.mask_bad, a.mask_repaired) == ([1, 0, 0, 1], [1, 0, 0, 1])
    assert (a.root_bad, a.root_repaired) == ([1, 0, 0, 0], [1, 0, 0, 0])


def test_adjacent_edits_form_one_hunk_for_the_root_cause():
    # "12" repaired to "5": replace then delete, one edit location; the later "4"->"6" is downstream.
    a = align([7, 1, 2, 0, 4], [7, 5, 0, 6])
    assert a.opcodes[:3] == [("equal", 0, 1, 0, 1), ("replace", 1, 2, 1, 2), ("delete", 2, 3, 2, 2)]
    assert a.mask_bad == [0, 1, 1, 0, 1] and a.mask_repaired == [0, 1, 0, 1]
    assert a.root_bad == [0, 1, 1, 0, 0] and a.root_repaired == [0, 1, 0, 0]


def test_repeated_tokens_edit_the_end_of_the_run():
    # [5,5,5] -> [5,5]: the longest common prefix is kept, the last 5 is the deleted one.
    assert masks([5, 5, 5], [5, 5]) == ([0, 0, 1], [0, 1], [0, 0, 1], [0, 1])
    # [5,5] -> [5,5,5]: insertion at the end blames the last bad token.
    assert masks([5, 5], [5, 5, 5]) == ([0, 1], [0, 0, 1], [0, 1], [0, 0, 1])
    assert masks([1, 5, 5, 5, 2], [1, 5, 5, 2]) == ([0, 0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 1])


def test_empty_sequences():
    a = align([], [])
    assert a == Alignment([], [], [], [], 0, 0.0, []) and a.opcodes == []
    a = align([], [1, 2])
    assert (a.mask_bad, a.mask_repaired, a.root_repaired) == ([], [1, 1], [1, 1])
    assert a.distance == 2 and a.edit_ratio == 2.0 and a.opcodes == [("insert", 0, 0, 0, 2)]
    a = align([1, 2], [])
    assert (a.mask_bad, a.mask_repaired, a.root_bad) == ([1, 1], [], [1, 1])
    assert a.distance == 2 and a.edit_ratio == 1.0 and a.opcodes == [("delete", 0, 2, 0, 0)]


def test_numpy_input_and_pickling():
    import numpy as np

    bad, rep = [3, 1, 4, 1, 5, 9, 2, 6], [3, 1, 4, 2, 5, 9, 6, 6, 7]
    a = align(np.array(bad, dtype=np.int32), np.array(rep, dtype=np.int64))
    assert a == align(bad, rep) and all(type(v) is int for v in a.mask_bad)
    _ = a.opcodes  # cached on the instance: must still pickle (multiprocessing)
    b = pickle.loads(pickle.dumps(a))
    assert b == a and b.opcodes == a.opcodes


def test_apply_opcodes_rejects_a_script_that_does_not_tile_the_sequences():
    with pytest.raises(ValueError):
        apply_opcodes([1, 2], [1, 3], [("equal", 0, 1, 0, 1)])
    with pytest.raises(ValueError):
        apply_opcodes([1, 2], [1, 3], [("equal", 0, 1, 0, 1), ("replace", 0, 2, 1, 2)])
    with pytest.raises(ValueError):
        apply_opcodes([1], [2], [("swap", 0, 1, 0, 1)])


def test_step_ids_split_on_newlines_and_step_markers():
    texts = ["Step", " 1", ":", " 3", " Step", " 2", ":", " 5", "\n", "a", "\n\n", "b", ".\nStep", " 3:", "x"]
    # line "Step 1: 3 Step 2: 5\n" is two steps; the blank line inside "\n\n" takes no token;
    # ".\nStep" starts on line "b" so belongs to it; " 3:" starts the next line.
    assert step_ids(texts) == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert step_ids(["red", " =", " 3", "\n", "blue", " =", " 5", "\n", "Answer", ":", " 8"]) == [0] * 4 + [1] * 4 + [2] * 3
    assert step_ids(["  Step 1:", " a", "\n", "Step 2: b"]) == [0, 0, 0, 1]  # marker at line start: no extra cut
    assert step_ids(["MyStep 2:", " a"]) == [0, 0]  # "Step" must be a word
    assert step_ids(["a", "\n", ""]) == [0, 0, 0]  # trailing end token stays in the last step
    assert step_ids([]) == []


def test_step_mask_marks_whole_steps():
    steps = [0, 0, 0, 1, 1, 2, 2]
    assert step_mask([0, 1, 0, 0, 0, 0, 1], steps) == [1, 1, 1, 0, 0, 1, 1]
    assert step_mask([], []) == []
    with pytest.raises(ValueError):
        step_mask([1], [0, 0])


def test_first_edit_position():
    assert first_edit_position([0, 0, 1, 1]) == 2
    assert first_edit_position([0, 0]) is None
    assert first_edit_position([]) is None
