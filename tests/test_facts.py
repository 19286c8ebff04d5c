"""The fact transformer, value targets (explicit pairs, optimised values) and ROME / MEMIT edits of facts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dissect.errors import RequestError
from dissect.memory import LayerMemory
from dissect.models.facts import (
    RELATIONS,
    SEQ_LEN,
    Fact,
    FactsCorpus,
    FactsGPT,
    FactsSampler,
    applied,
    causal_trace,
    counterfactuals,
    edit_facts,
    evaluate,
    load_facts,
    neighbours,
)
from dissect.rewrite import Rewriter, load
from dissect.valuetargets import insert, keys_at, linear_at, optimize_value, positions


@pytest.fixture(scope="module")
def tiny() -> tuple[FactsGPT, FactsCorpus, FactsSampler]:
    torch.manual_seed(0)
    corpus = FactsCorpus(12, seed=3)
    return FactsGPT(len(corpus.vocab), d=32, layers=2, heads=2, hidden=48).eval(), corpus, FactsSampler(corpus)


@pytest.fixture(scope="module")
def shipped() -> tuple[FactsGPT, FactsSampler]:
    model, sampler = load_facts()
    return model.float(), sampler


def fitted(model: nn.Module, layer: str, sampler, n: int = 64) -> LayerMemory:
    memory = LayerMemory(model, layer)
    memory.fit_moment(sampler, n, progress=False)
    return memory


def test_corpus_is_fixed_and_every_phrasing_holds_the_subject(tiny) -> None:
    _, corpus, sampler = tiny
    again = FactsCorpus(12, seed=3)
    assert again.facts == corpus.facts and again.vocab == corpus.vocab and again.names == corpus.names
    assert FactsCorpus(12, seed=4).facts != corpus.facts
    for relation, (objects, phrasings) in RELATIONS.items():
        for p in range(len(phrasings)):
            tokens, last = corpus.encode(5, relation, p)
            assert tokens.shape == (SEQ_LEN,) and tokens[0] == corpus.index["<bos>"]
            assert [corpus.vocab[t] for t in tokens[last - 1:last + 1]] == list(corpus.names[5])
            assert corpus.vocab[tokens[-1]] == objects[corpus.facts[5][relation]]
    assert torch.equal(sampler([3, 9]), sampler([3, 9])) and not torch.equal(sampler([3]), sampler([4]))
    assert sampler([3, 9]).shape == (2, SEQ_LEN)


def test_counterfactuals_change_the_object_and_neighbours_share_the_last_token(tiny) -> None:
    _, corpus, _ = tiny
    edits = counterfactuals(corpus, 20, seed=1)
    assert len({(f.entity, f.relation) for f in edits}) == 20
    assert all(f.obj != corpus.facts[f.entity][f.relation] for f in edits)
    near = neighbours(corpus, edits[0], n=3)
    assert edits[0].entity not in [f.entity for f in near]
    same = [e for e in range(corpus.n_entities) if e != edits[0].entity
            and corpus.names[e][1] == corpus.names[edits[0].entity][1]]
    assert [f.entity for f in near[:len(same)]] == same[:3]
    with pytest.raises(ValueError, match="pairs exist"):
        counterfactuals(corpus, 10_000)


def test_pairs_are_stored_exactly_and_other_keys_barely_move(tiny) -> None:
    model, corpus, sampler = tiny
    memory = fitted(model, "blocks.1.mlp.proj", sampler)
    tokens = sampler(list(range(500, 504)))
    where = positions(torch.tensor([4, 6, 8, 10]), SEQ_LEN)
    keys = keys_at(memory, tokens, where)
    values = linear_at(memory, tokens, where) + torch.randn(4, 32)
    edit = insert(memory, keys, values)
    assert edit.rank == 4 and edit.loss_after < 1e-8 * edit.loss_before
    rewriter = Rewriter(model)
    original = memory.weight.detach().clone()
    rewriter.apply(edit)
    assert torch.allclose(linear_at(memory, tokens, where), values, atol=1e-4)
    # A key C-orthogonal to the stored ones (D k = 0) keeps its value exactly; typical keys move far less.
    other = sampler(list(range(900, 964)))
    moved = (linear_at(memory, other, torch.ones(64, SEQ_LEN, dtype=torch.bool)) -
             (memory.keys(other) @ original.T + model.blocks[1].mlp.proj.bias).reshape(-1, 32)).norm(dim=1)
    assert moved.median() < 0.5 * (values - (keys @ original.T + model.blocks[1].mlp.proj.bias)).norm(dim=1).min()
    rewriter.undo()
    assert torch.equal(memory.weight, original)


def test_pair_edits_save_and_load(tiny, tmp_path) -> None:
    model, corpus, sampler = tiny
    memory = fitted(model, "blocks.0.mlp.proj", sampler)
    tokens = sampler([7])
    where = positions(torch.tensor([9]), SEQ_LEN)
    edit = insert(memory, keys_at(memory, tokens, where), linear_at(memory, tokens, where) + 1.0)
    rewriter = Rewriter(model)
    rewriter.apply(edit)
    edited = memory.weight.detach().clone()
    rewriter.save(str(tmp_path / "pairs.safetensors"))
    rewriter.undo()
    original = memory.weight.detach().clone()
    loaded = load(str(tmp_path / "pairs.safetensors"), model)
    assert torch.equal(memory.weight, edited)
    assert torch.equal(loaded.history[0].request["keys"], edit.request["keys"])
    loaded.revert()
    assert torch.equal(memory.weight, original)


def test_bad_pairs_are_refused_before_any_solve(tiny) -> None:
    model, _, sampler = tiny
    memory = LayerMemory(model, "blocks.0.mlp.proj")
    with pytest.raises(RequestError, match="keys \\(n, 48\\) and values \\(n, 32\\)"):
        insert(memory, torch.randn(2, 48), torch.randn(2, 31))
    with pytest.raises(RequestError, match="1 to 48 pairs"):
        insert(memory, torch.randn(49, 48), torch.randn(49, 32))
    with pytest.raises(ValueError, match="NaN"):
        insert(memory, torch.full((1, 48), float("nan")), torch.randn(1, 32))
    with pytest.raises(RuntimeError, match="fit_moment"):
        insert(memory, torch.randn(1, 48), torch.randn(1, 32))
    with pytest.raises(RequestError, match="mask on its key grid"):
        keys_at(memory, sampler([0]), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(RequestError, match="No location"):
        keys_at(memory, sampler([0]), torch.zeros(1, SEQ_LEN, dtype=torch.bool))


def test_conv_pairs_are_pointwise_and_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
    memory = LayerMemory(model, "2", image_size=(6, 6))
    sampler = lambda seeds: torch.stack([torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(s))  # noqa: E731
                                         for s in seeds])
    sampler.description = "test"
    memory.fit_moment(sampler, 32, progress=False)
    x = sampler([100])
    where = torch.zeros(1, 6, 6, dtype=torch.bool)
    where[0, 2, 3] = where[0, 4, 1] = True
    with pytest.raises(RequestError, match="pass current="):
        insert(memory, keys_at(memory, x, where), torch.randn(2, 5))
    values = linear_at(memory, x, where) + torch.randn(2, 5)
    edit = insert(memory, keys_at(memory, x, where), values, current=linear_at(memory, x, where))
    assert edit.pointwise and edit.lam.shape == (5, 2, 3, 3) and edit.lam[:, :, 0].abs().max() == 0
    rewriter = Rewriter(model)
    rewriter.apply(edit)
    # The keys' neighbours also change ΔW's input at these locations only through the centre tap, which the
    # solve accounted for; so the stored values hold exactly.
    assert torch.allclose(linear_at(memory, x, where), values, atol=1e-4)
    rewriter.undo()


def test_optimized_value_makes_the_model_answer_the_target(tiny) -> None:
    model, corpus, sampler = tiny
    memory = fitted(model, "blocks.0.mlp.proj", sampler)
    fact = Fact(2, "city", (corpus.facts[2]["city"] + 1) % 12)
    tokens, last = corpus.batch([fact] * 3, 0, [0, 1, 2])
    target = torch.full((3,), corpus.object_token("city", fact.obj))
    loss = lambda logits: nn.functional.cross_entropy(logits[:, -2], target)  # noqa: E731
    with torch.no_grad():
        before = float(loss(model(tokens)))
    value, _ = optimize_value(memory, tokens, positions(last, SEQ_LEN), loss, steps=30)
    assert value.shape == (32,)
    edit = insert(memory, keys_at(memory, tokens, positions(last, SEQ_LEN)).mean(0, keepdim=True), value[None])
    with applied(memory, edit), torch.no_grad():
        after = float(loss(model(tokens)))
    assert after < before


@pytest.mark.slow
def test_rome_edit_of_the_shipped_model(shipped) -> None:
    model, sampler = shipped
    corpus = sampler.corpus
    memory = fitted(model, "blocks.0.mlp.proj", sampler, n=300)
    facts = counterfactuals(corpus, 3, seed=5)
    before = evaluate(model, corpus, facts)
    assert before["efficacy"] == 0 and before["neighborhood"] > 0.9
    original = memory.weight.detach().clone()
    with applied(memory, edit_facts(memory, corpus, facts[:1], n_prefixes=3, steps=20)):
        one = evaluate(model, corpus, facts[:1])
    with applied(memory, edit_facts(memory, corpus, facts, n_prefixes=3, steps=20)):  # a MEMIT-style batch
        batch = evaluate(model, corpus, facts)
    assert torch.equal(memory.weight, original)
    assert one["efficacy"] == 1 and batch["efficacy"] == 1
    assert one["neighborhood"] > 0.6 and batch["neighborhood"] > 0.6


def test_causal_trace_finds_the_fact_after_the_subject(shipped) -> None:
    model, sampler = shipped
    corpus = sampler.corpus
    fact = corpus.true_fact(0, "language")
    grid, clean, corrupted = causal_trace(model, corpus, fact, samples=4)
    _, last = corpus.batch([fact], 0)
    assert grid.shape == (len(model.blocks), SEQ_LEN) and grid.min() >= 0 and grid.max() <= 1
    assert clean > 0.9 and corrupted < clean
    # Restoring the last block's output at the answer position restores the clean run exactly.
    assert grid[-1, -2] == pytest.approx(clean, abs=1e-5)
    # Before the subject, restoring changes nothing: the corruption comes later.
    assert grid[:, : int(last[0]) - 1].max() == pytest.approx(corrupted, abs=1e-5)


def test_load_facts_as_an_entry_point() -> None:
    from dissect.models import load

    model, sampler = load("dissect.models.facts:load_facts")
    assert isinstance(model, FactsGPT) and sampler([0]).shape == (1, SEQ_LEN)


def test_request_kinds_refuse_bad_input_before_any_solve(tiny) -> None:
    from dissect.rewrite import Request, solve
    from dissect.valuetargets import OutputTarget, Pairs

    model, corpus, sampler = tiny
    assert Request.kinds["Pairs"] is Pairs and Request.kinds["OutputTarget"] is OutputTarget
    memory = fitted(model, "blocks.0.mlp.proj", sampler)
    tokens = sampler([1, 2])
    masks = positions(torch.tensor([8, 8]), SEQ_LEN).float()
    weight = memory.weight.detach().clone()
    with pytest.raises(RequestError, match="indices in \\[0, "):
        solve(memory, OutputTarget(tokens, masks, torch.tensor([0, len(corpus.vocab)]), position=-2))
    with pytest.raises(RequestError, match="one integer target per input row"):
        solve(memory, OutputTarget(tokens, masks, torch.tensor([1]), position=-2))
    with pytest.raises(RequestError, match="outside the model's"):
        solve(memory, OutputTarget(tokens, masks, torch.tensor([1, 2]), position=SEQ_LEN))
    with pytest.raises(RequestError, match="shape of its output"):
        solve(memory, Pairs(tokens, masks, values=torch.zeros(2, SEQ_LEN, 31)))
    with pytest.raises(RequestError, match="either values"):
        solve(memory, Pairs(tokens, masks))
    assert torch.equal(memory.weight, weight)


class Squashed(nn.Module):
    memory_key_module = "lin"  # a composite layer: its weight, then a nonlinear rest

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def test_value_requests_need_the_weights_own_module() -> None:
    from dissect.rewrite import solve
    from dissect.valuetargets import Pairs

    model = nn.Sequential(Squashed())
    memory = LayerMemory(model, "0")
    memory.set_moment(torch.eye(4))
    with pytest.raises(RequestError, match="nonlinear rest"):
        solve(memory, Pairs(torch.randn(2, 4), None, values=torch.zeros(2, 3)))


def test_output_target_edits_save_with_their_request(tiny, tmp_path) -> None:
    from dissect.rewrite import solve
    from dissect.valuetargets import OutputTarget

    model, corpus, sampler = tiny
    memory = fitted(model, "blocks.1.mlp.proj", sampler)
    fact = Fact(4, "sport", (corpus.facts[4]["sport"] + 1) % 8)
    tokens, last = corpus.batch([fact] * 2, 1, [0, 1])
    target = torch.full((2,), corpus.object_token("sport", fact.obj))
    request = OutputTarget(tokens, positions(last, SEQ_LEN).float(), target, position=-2, steps=5)
    rewriter = Rewriter(model)
    rewriter.apply(solve(memory, request, budget=None))
    rewriter.save(str(tmp_path / "rome.safetensors"))
    edited = memory.weight.detach().clone()
    rewriter.undo()
    loaded = load(str(tmp_path / "rome.safetensors"), model)
    saved = loaded.history[0].request["target"]
    assert isinstance(saved, OutputTarget) and torch.equal(saved.targets, target) and saved.position == -2
    assert torch.equal(memory.weight, edited)
    loaded.revert()


@pytest.mark.slow
def test_a_second_fact_about_the_same_subject_is_refused_by_hard_protection_and_kept_by_soft(shipped) -> None:
    model, sampler = shipped
    corpus = sampler.corpus
    memory = fitted(model, "blocks.0.mlp.proj", sampler, 2000)
    # "{s} speaks" and "{s} plays": the same words up to the subject, so the same keys at its last token.
    language, sport = (Fact(0, r, (corpus.facts[0][r] + 1) % len(RELATIONS[r][0])) for r in ("language", "sport"))
    first = edit_facts(memory, corpus, [language], n_prefixes=3, steps=20)
    with applied(memory, first):
        with pytest.raises(RequestError, match="earlier edits protect"):
            edit_facts(memory, corpus, [sport], n_prefixes=3, steps=20, protect=[first], protect_mode="hard")
        second = edit_facts(memory, corpus, [sport], n_prefixes=3, steps=20, protect=[first])
        with applied(memory, second):
            assert evaluate(model, corpus, [language, sport], n_neighbours=0)["efficacy"] == 1.0
