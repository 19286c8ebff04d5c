"""A transformer that knows exact facts: a procedural corpus about invented people, and a small GPT that learns it.

The corpus is the transformer counterpart of the scene world: every fact is known exactly, so an edit is
measured like CounterFact (Meng et al., 2022) without a noisy reference model. An *entity* is a two-token
name (a first and a last syllable); each has one object per *relation* (home city, language, trade, sport,
colour), drawn from that relation's own objects. Each relation has three phrasings; the subject stands at the
start of some and in the middle of others, so an edit made through one phrasing is tested on the others
(paraphrase generalisation) and on other entities (neighbourhood specificity).

Every sequence has the fixed length ``SEQ_LEN``: ``bos``, filler words (a random prefix, as ROME averages keys
over random prefixes), the phrasing with the subject, and the object as the last token. The model predicts the
object at position ``SEQ_LEN - 2``. The model (:class:`FactsGPT`) is GPT-style: token and position embeddings,
pre-norm blocks of causal attention and an MLP ``fc -> GELU -> proj``; ``blocks.{i}.mlp.proj`` is the
``nn.Linear`` that ROME and MEMIT edit (its input, the MLP's hidden units, is the key).

``load_facts()`` returns the shipped model and a sampler of token batches (so does ``load("facts")``, as
``load("spires")`` the generator, and the CLI's ``--model facts``);
``python -m dissect.models.train_facts`` trains it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dissect.errors import ModelError
from dissect.hooks import TraceDict, eval_mode
from dissect.memory import LayerMemory
from dissect.rewrite import Context, Edit, solve
from dissect.valuetargets import OutputTarget, Pairs, optimize_value, positions

__all__ = [
    "RELATIONS",
    "SEQ_LEN",
    "Fact",
    "FactsCorpus",
    "FactsGPT",
    "FactsSampler",
    "load_facts",
    "evaluate",
    "answer_accuracy",
    "counterfactuals",
    "neighbours",
    "edit_layer",
    "fact_prompts",
    "edit_facts",
    "layer_sweep",
    "applied",
    "causal_trace",
]

WEIGHTS = Path(__file__).parent / "weights" / "facts-gpt.safetensors"
SEQ_LEN = 12

# relation -> (objects, phrasings); "{s}" is the subject (two tokens). Object words are unique to a relation.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "city": (
        ("paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "accra", "perth", "dakar", "hanoi"),
        ("{s} lives in", "the home of {s} is", "{s} resides in"),
    ),
    "language": (
        ("french", "latin", "hindi", "swahili", "greek", "thai", "dutch", "welsh"),
        ("{s} speaks", "the language of {s} is", "{s} is fluent in"),
    ),
    "trade": (
        ("baker", "pilot", "nurse", "judge", "farmer", "poet", "sailor", "miner", "chef", "tailor"),
        ("{s} works as a", "the trade of {s} is", "by trade {s} is a"),
    ),
    "sport": (
        ("chess", "tennis", "rugby", "golf", "polo", "squash", "hockey", "karate"),
        ("{s} plays", "the sport of {s} is", "{s} is a fan of"),
    ),
    "colour": (
        ("red", "blue", "green", "amber", "violet", "teal", "grey", "ochre"),
        ("{s} likes the colour", "the colour of {s} is", "{s} prefers"),
    ),
}
FIRST = ("zo", "ka", "mi", "tu", "ve", "ro", "sa", "li", "de", "nu", "ba", "fe", "go", "hi", "ju", "pe", "qa", "wi",
         "xo", "ye")
LAST = ("rak", "vin", "dol", "mex", "tun", "sil", "bor", "gan", "pel", "zur", "kot", "lam", "nix", "dap", "fur",
        "hov", "jem", "wus", "yat", "cer")
FILLERS = ("so", "well", "now", "indeed", "today", "also", "then", "yes", "and", "still")


@dataclass(frozen=True)
class Fact:
    """``entity`` (index) has ``obj`` (index into the relation's objects) for ``relation`` (a name)."""

    entity: int
    relation: str
    obj: int


class FactsCorpus:
    """The world of facts: ``n_entities`` invented people and one object per relation each, fixed by ``seed``.

    ``vocab`` is the fixed vocabulary (``<pad>``, ``<bos>``, fillers, template words, syllables, objects);
    ``facts[e][relation]`` the object index; :meth:`encode` builds a sequence for (entity, relation, phrasing,
    object) with a seeded filler prefix.
    """

    def __init__(self, n_entities: int = 300, seed: int = 0) -> None:
        if not 2 <= n_entities <= len(FIRST) * len(LAST):
            raise ValueError(f"n_entities must be in [2, {len(FIRST) * len(LAST)}], got {n_entities}.")
        gen = torch.Generator().manual_seed(seed)
        names = torch.randperm(len(FIRST) * len(LAST), generator=gen)[:n_entities]
        self.names = [(FIRST[int(i) // len(LAST)], LAST[int(i) % len(LAST)]) for i in names]
        self.n_entities, self.seed = n_entities, seed
        self.facts = [{r: int(torch.randint(len(objs), (), generator=gen)) for r, (objs, _) in RELATIONS.items()}
                      for _ in range(n_entities)]
        words = {w for _, templates in RELATIONS.values() for t in templates for w in t.split() if w != "{s}"}
        self.vocab = ["<pad>", "<bos>", *FILLERS, *sorted(words), *FIRST, *LAST,
                      *(o for objs, _ in RELATIONS.values() for o in objs)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.relations = list(RELATIONS)

    @property
    def description(self) -> str:
        return f"facts:n={self.n_entities}:seed={self.seed}:len={SEQ_LEN}"

    def object_token(self, relation: str, obj: int) -> int:
        return self.index[RELATIONS[relation][0][obj]]

    def object_tokens(self, relation: str) -> Tensor:
        """Token ids of the relation's objects ``(n_objects,)``: the answers an evaluation chooses among."""
        return torch.tensor([self.index[o] for o in RELATIONS[relation][0]])

    def encode(self, entity: int, relation: str, phrasing: int, obj: int | None = None, prefix_seed: int = 0
               ) -> tuple[Tensor, int]:
        """``(tokens (SEQ_LEN,), subject_last)``: the sequence ending in ``obj`` (default: the true object),
        left-filled with fillers drawn from ``prefix_seed``, and the position of the subject's last token."""
        obj = self.facts[entity][relation] if obj is None else obj
        words = RELATIONS[relation][1][phrasing].split()
        at = words.index("{s}")
        body = words[:at] + list(self.names[entity]) + words[at + 1:] + [RELATIONS[relation][0][obj]]
        n_fill = SEQ_LEN - 1 - len(body)
        gen = torch.Generator().manual_seed(prefix_seed)
        fill = [FILLERS[int(i)] for i in torch.randint(len(FILLERS), (n_fill,), generator=gen)]
        tokens = torch.tensor([self.index[w] for w in ["<bos>", *fill, *body]])
        return tokens, 1 + n_fill + at + 1

    def batch(self, facts: Sequence[Fact], phrasing: int | Sequence[int], prefix_seeds: Sequence[int] | int = 0
              ) -> tuple[Tensor, Tensor]:
        """``(tokens (N, SEQ_LEN), subject_last (N,))`` for ``facts`` (their ``obj`` is the last token)."""
        n = len(facts)
        phrasings = [phrasing] * n if isinstance(phrasing, int) else list(phrasing)
        seeds = [prefix_seeds] * n if isinstance(prefix_seeds, int) else list(prefix_seeds)
        rows = [self.encode(f.entity, f.relation, p, f.obj, s) for f, p, s in zip(facts, phrasings, seeds)]
        return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def true_fact(self, entity: int, relation: str) -> Fact:
        return Fact(entity, relation, self.facts[entity][relation])

    def all_facts(self) -> list[Fact]:
        return [self.true_fact(e, r) for e in range(self.n_entities) for r in self.relations]

    def sample(self, seed: int) -> Tensor:
        """One training sequence ``(SEQ_LEN,)`` drawn from ``seed``: a random true fact, phrasing and prefix."""
        gen = torch.Generator().manual_seed(seed)
        e, r, p = (int(torch.randint(k, (), generator=gen)) for k in (self.n_entities, len(self.relations), 3))
        return self.encode(e, self.relations[r], p, prefix_seed=seed + 1_000_003)[0]


class FactsSampler:
    """``sampler(seeds) -> tokens (N, SEQ_LEN)``: true facts in random phrasings and prefixes (the data C is
    taken over); ``description`` names the corpus."""

    def __init__(self, corpus: FactsCorpus) -> None:
        self.corpus = corpus
        self.description = corpus.description

    def __call__(self, seeds: Iterable[int] | Tensor) -> Tensor:
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        if not seeds:
            return torch.empty(0, SEQ_LEN, dtype=torch.long)
        return torch.stack([self.corpus.sample(int(s)) for s in seeds])


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, d)  # the memory ROME / MEMIT edit: key = the hidden units

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class FactsGPT(nn.Module):
    """A small causal transformer: ``model(tokens (N, T)) -> logits (N, T, vocab)``.

    Layer names: ``blocks.{i}`` (the residual stream after block i), ``blocks.{i}.mlp.proj`` (the edit site).
    """

    def __init__(self, vocab: int, d: int = 128, layers: int = 4, heads: int = 4, hidden: int = 512,
                 max_len: int = SEQ_LEN) -> None:
        super().__init__()
        self.config = dict(vocab=vocab, d=d, layers=layers, heads=heads, hidden=hidden, max_len=max_len)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def load_facts(path: str | Path = WEIGHTS, device: torch.device | str = "cpu") -> tuple[FactsGPT, FactsSampler]:
    """The shipped fact model (or one ``train_facts`` exported to ``path``) in eval mode, and its sampler."""
    from .loaders import build, load_state_dict, load_weights, read_config

    fix = "export it with `python -m dissect.models.train_facts`"
    state, meta = load_weights(path)
    info = read_config(meta, "facts", path, "facts-model", fix)
    if not (isinstance(info, dict) and isinstance(info.get("corpus"), dict) and isinstance(info.get("model"), dict)):
        raise ModelError(f"{path}: the facts-model configuration holds no 'corpus' and 'model' objects; {fix}.")
    corpus = build(FactsCorpus, info["corpus"], path, fix)
    model = build(FactsGPT, info["model"], path, fix)
    load_state_dict(model, state, source=str(path))
    return model.to(device).eval(), FactsSampler(corpus)


# ----------------------------------------------------------------------------------------------------------
# Evaluation with exact answers
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, corpus: FactsCorpus, facts: Sequence[Fact], phrasing: int | Sequence[int],
            prefix_seed: int = 0, batch_size: int = 512) -> Tensor:
    """The object index the model ranks first among each fact's relation's objects: ``(N,)``."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(facts), batch_size):
        chunk = facts[start:start + batch_size]
        ph = phrasing if isinstance(phrasing, int) else phrasing[start:start + batch_size]
        tokens, _ = corpus.batch(chunk, ph, prefix_seed)
        logits = model(tokens.to(device))[:, -2].cpu()
        for f, row in zip(chunk, logits):
            out.append(int(row[corpus.object_tokens(f.relation)].argmax()))
    return torch.tensor(out, dtype=torch.long)


def answer_accuracy(model: nn.Module, corpus: FactsCorpus, facts: Sequence[Fact] | None = None,
                    phrasings: Sequence[int] = (0, 1, 2), prefix_seed: int = 0) -> float:
    """Fraction of (fact, phrasing) prompts answered with the fact's object (default: every true fact)."""
    facts = corpus.all_facts() if facts is None else list(facts)
    want = torch.tensor([f.obj for f in facts])
    hits = [(predict(model, corpus, facts, p, prefix_seed) == want).float().mean() for p in phrasings]
    return float(torch.stack(hits).mean())


def neighbours(corpus: FactsCorpus, fact: Fact, n: int = 10) -> list[Fact]:
    """True facts of the same relation about up to ``n`` other entities, those sharing the edited subject's last
    token first (they share its key position's token, so they are the likeliest to be hit)."""
    last = corpus.names[fact.entity][1]
    others = [e for e in range(corpus.n_entities) if e != fact.entity]
    others.sort(key=lambda e: (corpus.names[e][1] != last, e))
    return [corpus.true_fact(e, fact.relation) for e in others[:n]]


def evaluate(model: nn.Module, corpus: FactsCorpus, edits: Sequence[Fact], edit_phrasing: int = 0,
             n_neighbours: int = 10, prefix_seed: int = 12345) -> dict[str, float]:
    """CounterFact-style scores with exact answers for ``edits`` (each a :class:`Fact` holding the *new* object):

    * ``efficacy``: fraction of edits whose edit phrasing now yields the new object;
    * ``paraphrase``: the same on the relation's other phrasings;
    * ``neighborhood``: fraction of neighbour prompts (:func:`neighbours`, same relation, other entities in
      every phrasing) still answered with their own true object, entities edited in the same batch excluded.

    Prompts use a filler prefix from ``prefix_seed`` that no edit saw.
    """
    edits = list(edits)
    new = torch.tensor([f.obj for f in edits])
    efficacy = (predict(model, corpus, edits, edit_phrasing, prefix_seed) == new).float().mean()
    others = [p for p in range(3) if p != edit_phrasing]
    para = torch.stack([(predict(model, corpus, edits, p, prefix_seed) == new).float() for p in others]).mean()
    edited = {(f.entity, f.relation) for f in edits}
    near = sorted({g for f in edits for g in neighbours(corpus, f, n_neighbours) if (g.entity, g.relation) not in edited},
                  key=lambda g: (g.entity, g.relation))
    hood = answer_accuracy(model, corpus, near, prefix_seed=prefix_seed) if near else float("nan")
    return {"efficacy": float(efficacy), "paraphrase": float(para), "neighborhood": hood}


def counterfactuals(corpus: FactsCorpus, n: int, seed: int = 0, relation: str | None = None) -> list[Fact]:
    """``n`` edits of distinct (entity, relation) pairs to a random object other than the true one."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(e, r) for e in range(corpus.n_entities) for r in corpus.relations if relation in (None, r)]
    if n > len(pairs):
        raise ValueError(f"Only {len(pairs)} (entity, relation) pairs exist; asked for {n} edits.")
    pick = torch.randperm(len(pairs), generator=gen)[:n]
    out = []
    for i in pick.tolist():
        e, r = pairs[i]
        k = len(RELATIONS[r][0])
        shift = 1 + int(torch.randint(k - 1, (), generator=gen))
        out.append(Fact(e, r, (corpus.facts[e][r] + shift) % k))
    return out


# ----------------------------------------------------------------------------------------------------------
# Editing facts: ROME / MEMIT at an MLP projection, a layer sweep, causal tracing
# ----------------------------------------------------------------------------------------------------------


def edit_layer(layer: int) -> str:
    """The ROME / MEMIT edit site of block ``layer``: its MLP's output projection."""
    return f"blocks.{layer}.mlp.proj"


def fact_prompts(corpus: FactsCorpus, facts: Sequence[Fact], phrasing: int = 0, n_prefixes: int = 5
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Each fact's prompt under ``n_prefixes`` filler prefixes: ``tokens (n·p, SEQ_LEN)``, ``masks (n·p, SEQ_LEN)``
    (1 at the subject's last token: where ROME reads ``k*`` and stores ``v*``) and ``targets (n·p,)`` (the token
    of each fact's ``obj``, to be read at position ``SEQ_LEN - 2``); rows grouped by fact."""
    rows = [f for f in facts for _ in range(n_prefixes)]
    tokens, last = corpus.batch(rows, phrasing, list(range(n_prefixes)) * len(facts))
    targets = torch.tensor([corpus.object_token(f.relation, f.obj) for f in rows])
    return tokens, positions(last, SEQ_LEN).float(), targets


def edit_facts(memory: LayerMemory, corpus: FactsCorpus, facts: Sequence[Fact], phrasing: int = 0,
               n_prefixes: int = 5, budget: float | None = None, protect: Sequence[Edit] = (),
               protect_mode: str = "soft", **value_args: float) -> Edit:
    """One edit storing every fact of ``facts`` (its ``obj`` the new object) at ``memory``'s layer, solved by
    :func:`dissect.rewrite.solve`; C must be set (``memory.fit_moment(sampler, n)``). The model is not changed.

    One fact: ROME, an :class:`~dissect.valuetargets.OutputTarget` over its prompt under ``n_prefixes`` prefixes
    (rank 1: the direction of the subject's keys). Several: MEMIT at one layer, each fact's ``v*`` found the same
    way, all stored by one :class:`~dissect.valuetargets.Pairs` edit of rank ``len(facts)``. ``budget``: the
    solve's smoothness budget (``None``: the least change that stores the values exactly; sequential edits need
    one, see ``docs/sequential.md``); ``protect``, ``protect_mode``: earlier edits whose keys this one must leave
    alone, and how (``solve``'s options).
    """
    tokens, masks, targets = fact_prompts(corpus, facts, phrasing, n_prefixes)
    args = dict(position=SEQ_LEN - 2, **value_args)
    if len(facts) == 1:
        return solve(memory, OutputTarget(tokens, masks, targets, **args), budget=budget, protect=protect,
                     protect_mode=protect_mode)
    rec = memory.record(tokens)
    values = rec.linear.clone()
    for i in range(len(facts)):
        rows = slice(i * n_prefixes, (i + 1) * n_prefixes)
        request = OutputTarget(tokens[rows], masks[rows], targets[rows], **args)
        _, shift = optimize_value(memory, tokens[rows], masks[rows] > 0, request.loss, **value_args)
        values[rows] += masks[rows, :, None] * shift
    context = Context(tokens, masks, rank=len(facts))
    return solve(memory, Pairs(tokens, masks, values), context, budget=budget, protect=protect, protect_mode=protect_mode)


def layer_sweep(model: FactsGPT, corpus: FactsCorpus, sampler: FactsSampler, facts: Sequence[Fact],
                layers: Sequence[int] | None = None, n_moment: int = 2000, cache_dir: str | None = None,
                **edit_args: float) -> dict[int, dict[str, float]]:
    """Which layer to edit: each fact of ``facts`` edited alone (ROME) at each block's projection, scored by
    :func:`evaluate` and averaged; ``score`` is the harmonic mean of efficacy, paraphrase and neighbourhood
    (CounterFact's); ``edit_args`` go to :func:`edit_facts`. The model is left as it was."""
    layers = range(len(model.blocks)) if layers is None else layers
    out = {}
    for layer in layers:
        memory = LayerMemory(model, edit_layer(layer))
        memory.fit_moment(sampler, n_moment, cache_dir=cache_dir, progress=False)
        runs = []
        for fact in facts:
            edit = edit_facts(memory, corpus, [fact], **edit_args)
            with applied(memory, edit):
                runs.append(evaluate(model, corpus, [fact]))
        scores = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        scores["score"] = 3 / sum(1 / max(v, 1e-6) for v in scores.values())
        out[layer] = scores
    return out


@contextlib.contextmanager
def applied(memory: LayerMemory, edit: Edit) -> Iterator[None]:
    """``with applied(memory, edit):`` the edit's ``ΔW`` is added to the weight inside the block, and the exact
    previous weight restored after (to score one edit at a time without keeping an edit stack's copies)."""
    weight = memory.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight += memory.delta(edit.lam.to(weight), edit.directions.to(weight))
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _corrupted_run(model: FactsGPT, corpus: FactsCorpus, fact: Fact, phrasing: int, noise: float, samples: int,
                   seed: int) -> tuple[Tensor, int, Callable[[Tensor, str], Tensor]]:
    """``(tokens (samples, SEQ_LEN), answer token, edit)``: ``edit`` adds seeded Gaussian noise (``noise`` times
    the embeddings' std) to the subject's two token embeddings, as a ``TraceDict`` edit of layer ``tok``."""
    tokens, last = corpus.batch([fact] * samples, phrasing)
    subject = slice(int(last[0]) - 1, int(last[0]) + 1)
    gen = torch.Generator().manual_seed(seed)
    kick = noise * float(model.tok.weight.std()) * torch.randn(samples, 2, model.config["d"], generator=gen)

    def corrupt(out: Tensor, layer: str) -> Tensor:
        out = out.clone()
        out[:, subject] += kick.to(out)
        return out

    return tokens, corpus.object_token(fact.relation, fact.obj), corrupt


@torch.no_grad()
def causal_trace(model: FactsGPT, corpus: FactsCorpus, fact: Fact, phrasing: int = 0, noise: float = 3.0,
                 samples: int = 10, seed: int = 0) -> tuple[Tensor, float, float]:
    """Where the model recalls ``fact`` (causal tracing, Meng et al. 2022).

    The subject's token embeddings are corrupted by Gaussian noise; then block ``l``'s clean output at token ``t``
    is restored. Returns ``(grid (layers, SEQ_LEN), clean, corrupted)``: the probability of the true object with
    each restoration (mean over ``samples`` noise draws), without corruption, and corrupted with no restoration.
    A high cell (l, t) says the hidden state there carries the fact.
    """
    tokens, answer, corrupt = _corrupted_run(model, corpus, fact, phrasing, noise, samples, seed)
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    prob = lambda: float(model(tokens)[:, -2].softmax(-1)[:, answer].mean())  # noqa: E731
    with eval_mode(model):
        with TraceDict(model, names) as clean_run:
            clean = prob()
        with TraceDict(model, ["tok"], edit_output=corrupt, retain_output=False):
            corrupted = prob()
        grid = torch.zeros(len(names), SEQ_LEN)
        for li, name in enumerate(names):
            for t in range(SEQ_LEN):
                def restore(out: Tensor, layer: str, name: str = name, t: int = t) -> Tensor:
                    out = out.clone()
                    out[:, t] = clean_run[name].output[:, t]
                    return out

                with TraceDict(model, ["tok"], edit_output=corrupt, retain_output=False), \
                        TraceDict(model, [name], edit_output=restore, retain_output=False):
                    grid[li, t] = prob()
    return grid, clean, corrupted
