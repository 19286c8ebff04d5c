"""The model zoos users bring: transformers (GPT-2, Llama), timm (ViT, ConvNeXt) and diffusers (UNet2DModel).

Every model is built from a tiny config with random weights (nothing is downloaded: HF_HUB_OFFLINE), and each
goes through what a user does: ``layers()``, C, a context, an edit solved and applied, and a bitwise undo. The
libraries are the ``zoo`` extra (``pip install -e .[zoo]``, which ``make install`` does); a test whose library is
absent is skipped.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / diffusers are imported: never reach the hub

from dissect import layers  # noqa: E402
from dissect.errors import LayerError  # noqa: E402
from dissect.memory import LayerMemory  # noqa: E402
from dissect.rewrite import Context, Rewriter, solve  # noqa: E402
from dissect.valuetargets import Pairs, insert, keys_at, linear_at, positions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, TOKENS = 64, 8


class Tokens:
    """Seeded token rows ``(N, TOKENS)``."""

    description = f"uniform tokens:{VOCAB}x{TOKENS}"

    def __call__(self, seeds: list[int]) -> torch.Tensor:
        return torch.stack([torch.randint(VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(s)) for s in seeds])


class Images:
    """Seeded images ``(N, 3, size, size)``; with ``timesteps``, a UNet's keywords ``{sample, timestep}``."""

    def __init__(self, size: int, timesteps: bool = False) -> None:
        self.size, self.timesteps = size, timesteps
        self.description = f"normal images:3x{size}x{size}:timesteps={timesteps}"

    def __call__(self, seeds: list[int]) -> Any:
        images = torch.stack([torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(s))
                              for s in seeds])
        if not self.timesteps:
            return images
        return {"sample": images, "timestep": torch.tensor([10 + 7 * s % 900 for s in seeds])}


@dataclass
class Zoo:
    """A zoo model, its sampler, the layer the edit test rewrites and the masks its requests take."""

    model: torch.nn.Module
    sampler: Callable[[list[int]], Any]
    layer: str
    masks: Callable[[int], torch.Tensor]  # rows -> masks for a request on `layer`


def _token_masks(rows: int) -> torch.Tensor:
    return positions(torch.full((rows,), TOKENS - 2), TOKENS).float()  # one position per sequence


def _box_masks(size: int) -> Callable[[int], torch.Tensor]:
    def masks(rows: int) -> torch.Tensor:
        m = torch.zeros(rows, size, size)
        m[:, size // 4 : size // 2, size // 4 : size // 2] = 1
        return m

    return masks


def gpt2() -> Zoo:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    # The square attention output projection: read as (out, in) its weight would fit every shape check.
    return Zoo(transformers.GPT2LMHeadModel(config).eval(), Tokens(), "transformer.h.1.attn.c_proj", _token_masks)


def llama() -> Zoo:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Zoo(transformers.LlamaForCausalLM(config).eval(), Tokens(), "model.layers.1.mlp.down_proj", _token_masks)


def vit() -> Zoo:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=5)
    return Zoo(model.eval(), Images(32), "blocks.1.mlp.fc2", lambda rows: positions(torch.full((rows,), 3), 17).float())


def convnext() -> Zoo:
    timm = pytest.importorskip("timm")
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    # conv_mlp=False (timm's default): the block MLP is nn.Linear on channels-last (N, H, W, C) maps.
    model = ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 24, 32, 32), num_classes=5, conv_mlp=False)
    assert timm  # imported for the skip
    return Zoo(model.eval(), Images(64), "stages.1.blocks.0.mlp.fc2", _box_masks(64))


def unet() -> Zoo:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return Zoo(model.eval(), Images(16, timesteps=True), "down_blocks.1.resnets.0.conv2", _box_masks(16))


ZOO = {"gpt2": gpt2, "llama": llama, "vit": vit, "convnext": convnext, "unet": unet}


@pytest.fixture(scope="module", params=list(ZOO))
def zoo(request) -> Zoo:
    return ZOO[request.param]()


def _weight_output(memory: LayerMemory, keys: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the memory says ``weight`` emits for ``keys``, with the module's bias."""
    out = memory.adapter.linear(memory.key_module, keys, weight)
    bias = getattr(memory.key_module, "bias", None)
    if bias is None:
        return out
    shape = [1] * out.dim()
    shape[memory.adapter.channel_dim] = -1
    return out + bias.view(shape)


@pytest.mark.slow
def test_every_listed_layer_is_a_memory_whose_w_k_is_the_modules_own_output(zoo):
    """For every layer ``layers()`` lists, W k computed by the memory from the adapter's layout equals what the
    module itself emits (a transposed weight would not), and its keys hold channels where the memory says."""
    infos = layers(zoo.model, zoo.sampler([0]))
    names = [i.name for i in infos]
    assert zoo.layer in names and len(names) >= 4
    x = zoo.sampler([0, 1])
    for info in infos:
        memory = LayerMemory(zoo.model, info.name)
        rec = memory.record(x)
        assert rec.keys.shape[memory.adapter.channel_dim] == memory.key_channels == info.in_channels
        assert rec.linear.shape[memory.adapter.channel_dim] == memory.out_channels == info.out_channels
        torch.testing.assert_close(_weight_output(memory, rec.keys, memory.weight), rec.linear, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_c_context_edit_and_bitwise_undo(zoo):
    memory = LayerMemory(zoo.model, zoo.layer)
    n = 24
    memory.fit_moment(zoo.sampler, n, batch_size=8, progress=False)
    # C is E[k kᵀ] over the keys with channels where they are (stats.collect and the memory agree on the layout).
    keys = memory.flat_keys(memory.keys(zoo.sampler(list(range(n))))).double()
    torch.testing.assert_close(memory.moment.double().cpu(), keys.T @ keys / len(keys), rtol=1e-5, atol=1e-7)

    inputs, values_from = zoo.sampler([30, 31]), zoo.sampler([40, 41])
    masks = zoo.masks(2)
    d = memory.directions(inputs, masks, rank=1)
    assert d.shape == (1, memory.key_channels)
    torch.testing.assert_close(float(d.double() @ memory.regularised_moment().to(d.device) @ d.double().T), 1.0,
                               rtol=1e-4, atol=1e-4)  # rows are orthonormal in the metric of C
    assert memory.match(d, inputs).shape[0] == 2

    model = zoo.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = memory.record(inputs)
    edit = solve(memory, Pairs(inputs, masks, value_inputs=values_from), Context(inputs, masks, rank=1))
    assert edit.loss_after < edit.loss_before
    rewriter = Rewriter(model)
    rewriter.apply(edit)
    after = memory.record(inputs)
    # The module's own output moved by exactly what the memory's ΔW predicts for these keys.
    moved = memory.adapter.linear(memory.key_module, before.keys, memory.delta(edit.lam, edit.directions))
    torch.testing.assert_close(after.linear - before.linear, moved, rtol=1e-4, atol=1e-5)
    assert not torch.equal(after.linear, before.linear)

    rewriter.undo()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(memory.record(inputs).linear, before.linear)


def test_gpt2_conv1d_stores_exact_pairs_through_its_in_out_weight():
    """ROME/MEMIT's closed form on GPT-2's Conv1D: the stored keys then read back exactly the values asked for."""
    zoo = gpt2()
    memory = LayerMemory(zoo.model, zoo.layer)
    assert memory.weight.shape == (32, 32) and memory.adapter.key_axis == 0  # Conv1D: (in, out)
    memory.fit_moment(zoo.sampler, 32, progress=False)
    inputs, where = zoo.sampler([50, 51, 52]), zoo.masks(3).bool()
    keys, current = keys_at(memory, inputs, where), linear_at(memory, inputs, where)
    values = current + torch.randn(current.shape, generator=torch.Generator().manual_seed(0))
    rewriter = Rewriter(zoo.model)
    rewriter.apply(insert(memory, keys, values, current=current))
    torch.testing.assert_close(linear_at(memory, inputs, where), values, rtol=1e-4, atol=1e-4)
    rewriter.undo()


def test_a_tied_weight_is_not_listed_and_is_refused_by_name():
    zoo = gpt2()
    assert zoo.model.lm_head.weight is zoo.model.transformer.wte.weight
    assert "lm_head" not in [i.name for i in layers(zoo.model, zoo.sampler([0]))]
    with pytest.raises(LayerError, match=r"lm_head\.weight\) is tied to transformer\.wte\.weight"):
        LayerMemory(zoo.model, "lm_head")


def test_convnext_depthwise_convs_are_not_listed_and_are_refused():
    zoo = convnext()
    conv_dw = "stages.1.blocks.0.conv_dw"
    assert zoo.model.get_submodule(conv_dw).groups > 1
    assert conv_dw not in [i.name for i in layers(zoo.model, zoo.sampler([0]))]
    with pytest.raises(LayerError, match="grouped convolutions"):
        LayerMemory(zoo.model, conv_dw)


@pytest.mark.slow
def test_importing_dissect_never_imports_the_zoo_libraries():
    code = ("import sys, dissect, dissect.memory, dissect.stats, dissect.rewrite, dissect.valuetargets; "
            "print(sorted(m for m in ('transformers', 'timm', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_the_guides_gpt2_example_runs_and_changes_the_answer(capsys):
    pytest.importorskip("transformers")
    guide = (Path(__file__).parents[1] / "docs" / "zoo.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", guide, re.S)
    exec(compile(code, "docs/zoo.md", "exec"), {})
    assert "answer now [42, 42, 42, 42]" in capsys.readouterr().out
