"""LayerMemory: adapters and weight layouts, keys and values, C and its ridge, directions, masks, matching, clusters."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dissect.errors import LayerError, NonFiniteError, RequestError
from dissect.memory import KeyClusters, LayerMemory, MemoryAdapter, bounding_boxes, register_adapter
from dissect.models.stylegan import ModulatedConv2d

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")




def _fit(memory: LayerMemory, inputs) -> torch.Tensor:
    k = memory.flat_keys(memory.keys(inputs)).double()
    return memory.set_moment((k.T @ k / len(k)).float())


def _c_reg(memory: LayerMemory) -> torch.Tensor:
    """C + ridge · tr(C)/C_dim · I, as the module docstring promises."""
    c = memory.moment.double()
    return c + memory.ridge * torch.trace(c) / len(c) * torch.eye(len(c), dtype=torch.float64)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4))


def _convnet(last: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), last)


class Modulated(nn.Module):
    """The generator's modulated convolution behind a constant, as in a synthesis block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.const = nn.Parameter(torch.randn(1, 6, 8, 8))
        self.mod = ModulatedConv2d(6, 5, 4, resolution=16, up=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mod(self.const.expand(len(z), -1, -1, -1), z)


LAYOUTS = {
    "conv3x3_stride2": (lambda: _convnet(nn.Conv2d(6, 4, 3, stride=2, padding=1)), lambda: torch.randn(3, 3, 12, 12)),
    "conv_transpose": (lambda: _convnet(nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)), lambda: torch.randn(3, 3, 6, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 1), nn.ReLU(), nn.Conv1d(6, 4, 3, padding=1)),
               lambda: torch.randn(3, 3, 10)),
    "linear_tokens": (_mlp, lambda: torch.randn(3, 7, 3)),
    "linear_rows": (_mlp, lambda: torch.randn(3, 3)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_design_and_delta_describe_what_the_weight_does(name):
    # The closed form rests on: linear(keys, ΔW(Λ, D)) = Σ_j Λ[:, j] · design(keys, D)[:, j].
    make, inputs = LAYOUTS[name]
    model, x = make(), inputs()
    memory = LayerMemory(model, "2")
    keys = memory.keys(x)
    r = 2
    d = torch.randn(r, memory.key_channels)
    lam = torch.randn(memory.out_channels, r, *memory.kernel_shape)
    delta = memory.delta(lam, d)
    assert delta.shape == memory.weight.shape
    direct = memory.adapter.linear(memory.key_module, keys, delta)
    u = memory.design(keys, d)
    cd = memory.adapter.channel_dim
    via_design = torch.einsum("oj,nj...->no...", lam.reshape(len(lam), -1), u.movedim(cd, 1)).movedim(1, cd)
    torch.testing.assert_close(via_design, direct, rtol=1e-4, atol=1e-5)


def test_conv_transpose_delta_respects_its_in_out_layout():
    memory = LayerMemory(_convnet(nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)), "2")
    assert memory.weight.shape == (6, 4, 4, 4) and memory.key_channels == 6 and memory.out_channels == 4
    lam, d = torch.randn(4, 2, 4, 4), torch.randn(2, 6)
    torch.testing.assert_close(memory.delta(lam, d), torch.einsum("oryx,ri->ioyx", lam, d))


def test_keys_and_values_are_the_layers_input_and_output():
    model = _convnet(nn.Conv2d(6, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    memory = LayerMemory(model, "2")
    with torch.no_grad():
        hidden = model[1](model[0](x))
        torch.testing.assert_close(memory.keys(x), hidden)
        torch.testing.assert_close(memory.values(x), model[2](hidden))


def test_modulated_conv_keys_are_the_modulated_upsampled_input():
    model = Modulated()
    memory = LayerMemory(model, "mod")
    assert memory.key_layer == "mod.conv" and memory.weight_name == "conv.weight"
    assert memory.parameter_name == "mod.conv.weight" and memory.weight is model.mod.conv.weight
    z = torch.randn(2, 4)
    keys = memory.keys(z)
    assert keys.shape == (2, 6, 16, 16)  # keys sit at the upsampled resolution
    with torch.no_grad():
        styles = model.mod.affine(z) * model.mod.weight_gain
        up = F.interpolate(model.const.expand(2, -1, -1, -1), scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(keys, up * styles[:, :, None, None])
    assert memory.mask_size(z, (16, 16)) == (16, 16)  # from the model's image output


def test_masks_are_drawn_at_the_larger_of_the_models_input_and_output_images():
    decoder = nn.Sequential(nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    assert LayerMemory(decoder, "2").mask_size(torch.randn(2, 4, 5, 5), (10, 10)) == (10, 10)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    assert LayerMemory(encoder, "2").mask_size(torch.randn(2, 3, 12, 12), (6, 6)) == (12, 12)
    memory = LayerMemory(_mlp(), "2")
    with pytest.raises(ValueError, match="image_size"):
        memory.mask_size(torch.randn(2, 3), (4, 4))
    assert LayerMemory(_mlp(), "2", image_size=(8, 8)).mask_size(torch.randn(2, 3), (4, 4)) == (8, 8)


def test_forward_passes_leave_batchnorm_statistics_and_modes_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory = LayerMemory(model, "3")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(memory.keys(x), memory.keys(x))  # dropout is off
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("module, why", [
    (nn.ReLU(), "no registered memory adapter"),
    (nn.BatchNorm2d(3), "no registered memory adapter"),
    (nn.Conv2d(4, 4, 3, groups=2), "grouped"),
])
def test_layers_without_a_usable_weight_say_what_is_supported(module, why):
    model = nn.Sequential(nn.Identity(), module)
    with pytest.raises(TypeError, match=why) as err:
        LayerMemory(model, "1")
    assert "Conv2d" in str(err.value) and "register_adapter" in str(err.value)


def test_users_register_their_own_adapter():
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(5, 3))  # (in, out)

        def forward(self, x):
            return x @ self.kernel

    register_adapter(Dense, MemoryAdapter("kernel", key_axis=0, out_axis=1, channel_dim=-1,
                                          linear=lambda m, k, w: k @ w))
    memory = LayerMemory(nn.Sequential(Dense()), "0")
    assert (memory.key_channels, memory.out_channels, memory.kernel_shape) == (5, 3, ())
    torch.testing.assert_close(memory.delta(torch.ones(3, 1), torch.ones(1, 5)), torch.ones(5, 3))


def test_unknown_layer_name_suggests_close_ones():
    with pytest.raises(KeyError, match="'2'"):
        LayerMemory(_convnet(nn.Conv2d(6, 4, 1)), "22")


def test_ridge_makes_a_singular_moment_usable():
    memory = LayerMemory(_convnet(nn.Conv2d(6, 4, 1)), "2")
    basis = torch.randn(2, 6)
    c = basis.T @ basis  # rank 2 of 6
    memory.set_moment(c)
    evals, _ = memory.eigh()
    floor = memory.ridge * torch.trace(c.double()) / 6
    assert floor - 1e-6 <= evals.min() <= floor + 1e-6
    k = torch.randn(4, 6)
    assert torch.isfinite(memory.whiten(k)).all() and torch.isfinite(memory.solve_moment(k)).all()
    # The ridge is tiny relative to C: on C's range the solve is (almost) the pseudo-inverse.
    on_range = (torch.randn(3, 2) @ basis).double()
    torch.testing.assert_close(memory.solve_moment(on_range) @ c.double(), on_range, rtol=1e-3, atol=1e-3)
    d = memory.directions_from_keys(torch.randn(10, 2) @ basis, torch.ones(10), rank=2)
    torch.testing.assert_close(d.double() @ _c_reg(memory) @ d.double().T, torch.eye(2, dtype=torch.float64),
                               atol=1e-4, rtol=0)


class NoiseSampler:
    description = "test: 3x8x8 standard normal images"

    def __call__(self, seeds):
        return torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_fit_moment_collects_the_keys_second_moment_and_caches_it(tmp_path):
    model = _convnet(nn.Conv2d(6, 4, 3, padding=1))
    memory = LayerMemory(model, "2")
    c = memory.fit_moment(NoiseSampler(), 10, cache_dir=tmp_path, batch_size=4, progress=False)
    keys = memory.flat_keys(memory.keys(NoiseSampler()(range(10)))).double()
    torch.testing.assert_close(c.double(), keys.T @ keys / len(keys), rtol=1e-5, atol=1e-7)
    assert len(list(tmp_path.iterdir())) == 1
    again = LayerMemory(model, "2").fit_moment(NoiseSampler(), 10, cache_dir=tmp_path, progress=False)
    assert torch.equal(again, c)


def test_moment_is_required_and_checked():
    memory = LayerMemory(_convnet(nn.Conv2d(6, 4, 1)), "2")
    with pytest.raises(RuntimeError, match="fit_moment"):
        memory.whiten(torch.randn(6))
    with pytest.raises(ValueError, match=r"\(6, 6\)"):
        memory.set_moment(torch.eye(5))
    with pytest.raises(ValueError, match="never fire"):
        memory.set_moment(torch.zeros(6, 6))


@pytest.fixture
def conv_memory():
    model = _convnet(nn.Conv2d(6, 4, 3, padding=1))
    memory = LayerMemory(model, "2")
    _fit(memory, torch.randn(32, 3, 8, 8))
    return memory


def test_single_key_direction_is_c_inverse_k(conv_memory):
    k = torch.rand(1, 6)
    d = conv_memory.directions_from_keys(k, torch.ones(1), rank=1)[0]
    expected = torch.linalg.solve(_c_reg(conv_memory), k[0].double()).float()
    assert torch.nn.functional.cosine_similarity(d, expected, dim=0) > 1 - 1e-5
    assert d @ k[0] > 0


def test_directions_are_c_orthonormal_and_sign_consistent(conv_memory):
    x = torch.randn(3, 3, 8, 8)
    masks = torch.zeros(3, 8, 8)
    masks[:, 2:6, 1:5] = 1.0
    masks[0, 2, 1] = 0.5
    d = conv_memory.directions(x, masks, rank=3)
    assert d.shape == (3, 6)
    c = _c_reg(conv_memory)
    torch.testing.assert_close(d.double() @ c @ d.double().T, torch.eye(3, dtype=torch.float64), atol=1e-4, rtol=0)
    keys = conv_memory.flat_keys(conv_memory.keys(x))
    w = conv_memory.mask_weights(masks, x, conv_memory.keys(x)).reshape(-1)
    assert ((keys @ d.T) * w[:, None]).sum(0).min() > 0


def test_rank_larger_than_the_context_is_refused(conv_memory):
    x = torch.randn(1, 3, 8, 8)
    mask = torch.zeros(8, 8)
    mask[3, 3:5] = 1.0  # two key locations
    assert conv_memory.directions(x, mask, rank=2).shape == (2, 6)
    with pytest.raises(ValueError, match="Rank 3.*has 2"):
        conv_memory.directions(x, mask, rank=3)


def test_masks_are_checked_and_resized_as_soft_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 4, 1))  # key grid is half the image
    memory = LayerMemory(model, "1")
    x = torch.randn(2, 3, 16, 16)
    keys = memory.keys(x)
    mask = torch.zeros(2, 16, 16)
    mask[:, 0:2, 0:3] = 1.0
    w = memory.mask_weights(mask, x, keys)
    assert w.shape == (2, 8, 8)
    torch.testing.assert_close(w[0, 0, :3], torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(w.sum(dim=(1, 2)) * 4, mask.sum(dim=(1, 2)))
    good = mask[:1]
    cases = [
        (torch.zeros(1, 16, 16), ValueError, "empty"),
        (torch.ones(1, 16, 16), ValueError, "whole image"),
        (torch.zeros(1, 8, 8) + 0.5, ValueError, r"\(1, 16, 16\)"),
        (good * 2, ValueError, r"\[0, 1\]"),
        (good.bool(), RequestError, "float"),
        (torch.cat([good, good]), ValueError, "one per input row"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            memory.mask_weights(bad, x[:1], keys[:1])


def test_match_scores_the_context_component(conv_memory):
    x = torch.randn(4, 3, 8, 8)
    keys = conv_memory.keys(x)
    d = conv_memory.directions_from_keys(keys[2, :, 5, 6][None], torch.ones(1), rank=1)
    scores = conv_memory.match(d, x)
    assert scores.shape == (4, 8, 8)
    torch.testing.assert_close(scores, (keys.movedim(1, -1) @ d.T).norm(dim=-1))
    order, best = conv_memory.rank_images(d, x)
    assert torch.equal(best, scores.reshape(4, -1).amax(1)[order]) and (best[:-1] >= best[1:]).all()


def test_threshold_is_a_quantile_over_the_pool(conv_memory):
    sampler = NoiseSampler()
    d = conv_memory.directions_from_keys(torch.rand(1, 6), torch.ones(1))
    level = conv_memory.threshold(d, sampler, list(range(10)), quantile=0.9, batch_size=4)
    scores = conv_memory.match(d, sampler(list(range(10)))).reshape(-1)
    assert (scores > level).float().mean() == pytest.approx(0.1, abs=0.01)


def test_context_units_rank_the_unusually_active_channel_first(conv_memory):
    x = torch.randn(1, 3, 8, 8)
    mask = torch.zeros(8, 8)
    mask[2:4, 2:4] = 1.0

    def plant(module, args):
        keys = args[0].clone()
        keys[:, 4, 2:4, 2:4] += 50.0
        return (keys,)

    handle = conv_memory.key_module.register_forward_pre_hook(plant)
    try:
        units = conv_memory.context_units(x, mask, 2)
    finally:
        handle.remove()
    assert units[0] == 4 and units.shape == (2,)


def _label_world(seeds):
    """Images whose 4 channels one-hot encode a label map painted in 2x2 blocks; labels at image resolution."""
    images, labels = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        small = torch.randint(0, 4, (8, 8), generator=g)
        lab = small.repeat_interleave(2, 0).repeat_interleave(2, 1)
        images.append(F.one_hot(lab, 4).permute(2, 0, 1).float() + 0.01 * torch.randn(4, 16, 16, generator=g))
        labels.append(lab)
    return torch.stack(images), torch.stack(labels)


def test_key_clusters_are_reproducible_and_named_by_best_iou():
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 3, 1))
    memory = LayerMemory(model, "1")

    def sampler(seeds):
        return _label_world(seeds)[0]

    _fit(memory, sampler(range(20)))
    clusters = memory.cluster_keys(sampler, list(range(20)), k=4, per_image=32, seed=1)
    again = KeyClusters(memory, 4, seed=1).fit(sampler, list(range(20)), per_image=32)
    images, labels = _label_world([100, 101])
    maps = clusters.predict(images)
    assert maps.shape == (2, 8, 8) and maps.dtype == torch.int64
    assert torch.equal(maps, again.predict(images))
    names = clusters.name(maps, labels, classes=["a", "b", "c", "d"])
    assert sorted(n.label for n in names) == [0, 1, 2, 3]
    assert all(n.iou == pytest.approx(1.0) and n.name == "abcd"[n.label] for n in names)
    masks = clusters.masks(images, names[0].cluster)
    assert masks.shape == (2, 16, 16)
    assert torch.equal(masks.bool(), labels == names[0].label)


def test_ablate_zeroes_key_units_in_every_forward_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    memory = LayerMemory(model, "2")
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    units = torch.tensor([1, 4])
    with memory.ablate(units):
        keys = memory.keys(x)
        ablated = model(x)
    assert keys[:, units].abs().sum() == 0 and keys[:, [0, 2, 3, 5]].abs().sum() > 0
    hidden = model[1](model[0](x))
    hidden[:, units] = 0
    torch.testing.assert_close(ablated, model[2](hidden))
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_bounding_boxes_fill_each_rows_box_keep_the_dtype_and_leave_empty_rows_empty():
    mask = torch.zeros(3, 8, 10)
    mask[0, 2, 3] = mask[0, 5, 7] = 0.5  # two corners of a 4x5 box
    mask[1, 0, 0] = 1.0
    expected = torch.zeros(3, 8, 10)
    expected[0, 2:6, 3:8] = 1
    expected[1, 0, 0] = 1
    assert torch.equal(bounding_boxes(mask), expected)
    assert torch.equal(bounding_boxes(mask > 0), expected > 0)  # bool in, bool out
    tokens = torch.tensor([[0.0, 0.2, 0.0, 0.7, 0.0]])  # a 1-D grid (Linear over tokens)
    assert bounding_boxes(tokens).tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


# -- refusals and the Cholesky whitening --------------------------------------------------------------------------


def test_a_layer_run_twice_per_forward_is_refused_with_its_call_count():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.block = nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x):
            x = self.stem(x)
            for _ in range(3):
                x = torch.relu(self.block(x))
            return x

    model = Loop()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(LayerError, match="Layer 'block' runs 3 times in one forward"):
        LayerMemory(model, "block").keys(x)
    assert LayerMemory(model, "stem").keys(x).shape == (2, 3, 8, 8)


def test_adapter_layout_lists_the_documented_example_in_layers():
    from dissect.hooks import layers

    class Kernel(nn.Module):  # the MemoryAdapter docstring's example: self.kernel laid out (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return x @ self.kernel

    register_adapter(Kernel, MemoryAdapter("kernel", key_axis=0, out_axis=1, channel_dim=-1,
                                           linear=lambda m, k, w: k @ w))
    (info,) = layers(nn.Sequential(Kernel()), torch.randn(2, 5))
    assert (info.name, info.in_channels, info.out_channels, info.kernel_size, info.output_size) == ("0", 5, 3, (), ())


class _Pair(nn.Module):
    """A decoder whose image sits inside a tuple (input) or a dict (output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, image, scale):
        return {"features": self.conv(image) * scale, "scale": scale}


def test_masks_find_the_image_inside_tuple_and_dict_inputs():
    memory = LayerMemory(_Pair(), "conv")
    inputs = (torch.randn(2, 3, 12, 12), torch.ones(2, 1, 1, 1))
    assert memory.mask_size(inputs, (6, 6)) == (12, 12)
    masks = torch.zeros(2, 12, 12)
    masks[:, :4, :4] = 1
    assert memory.mask_weights(masks, inputs, memory.keys(inputs)).shape == (2, 12, 12)  # keys are the input
    as_dict = {"image": inputs[0], "scale": inputs[1]}
    assert LayerMemory(_Pair(), "conv").mask_size(as_dict, (6, 6)) == (12, 12)


def test_rank_is_refused_in_three_words_before_anything_runs(conv_memory):
    keys, weights = torch.randn(2, 6), torch.ones(2)
    for rank in (0, -1, 1.5, "2", True):
        with pytest.raises(RequestError, match="is not a positive integer"):
            conv_memory.directions_from_keys(keys, weights, rank)
    with pytest.raises(RequestError, match="Rank 7 is above the key dimension of layer '2': its keys have 6 channels"):
        conv_memory.directions_from_keys(torch.randn(10, 6), torch.ones(10), 7)
    with pytest.raises(RequestError, match="Rank 3 needs at least 3 context keys at layer '2'; the context has 2"):
        conv_memory.directions_from_keys(keys, weights, 3)
    with pytest.raises(RequestError, match=r"span only 1 direction\(s\), so rank 2"):
        conv_memory.directions_from_keys(torch.randn(1, 6).expand(5, 6), torch.ones(5), 2)
    # directions() refuses the rank before it runs the model.
    calls = []
    handle = conv_memory.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(RequestError, match="above the key dimension"):
            conv_memory.directions(torch.randn(1, 3, 8, 8), torch.ones(8, 8) * 0.5, rank=9)
    finally:
        handle.remove()
    assert not calls


def test_zero_and_non_finite_contexts_are_refused_and_change_nothing(conv_memory):
    with pytest.raises(RequestError, match="The context's keys are all zero at layer '2'"):
        conv_memory.directions_from_keys(torch.zeros(4, 6), torch.ones(4))
    model = conv_memory.model
    with torch.no_grad():
        model[0].bias.fill_(-1e3)  # every key after the ReLU is zero
    mask = torch.zeros(8, 8)
    mask[2:5, 2:5] = 1
    try:
        with pytest.raises(RequestError, match="all zero"):
            conv_memory.directions(torch.randn(1, 3, 8, 8), mask)
    finally:
        model[0].reset_parameters()
    with pytest.raises(NonFiniteError, match="keys or weights at layer '2' hold NaN or Inf"):
        conv_memory.directions_from_keys(torch.tensor([[float("nan")] * 6]), torch.ones(1))
    with pytest.raises(NonFiniteError, match="The keys of layer '2' hold NaN or Inf"):
        conv_memory.directions(torch.full((1, 3, 8, 8), float("inf")), mask)


def test_non_finite_weights_and_moments_are_refused_before_any_solver(conv_memory):
    moment = conv_memory.moment.clone()
    for bad in (float("nan"), float("inf")):
        c = moment.clone()
        c[0, 1] = bad
        with pytest.raises(NonFiniteError, match="C for layer '2' holds NaN or Inf"):
            conv_memory.set_moment(c)
        assert torch.equal(conv_memory.moment, moment)  # the old C stays
    weight = conv_memory.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    mask = torch.zeros(8, 8)
    mask[2:5, 2:5] = 1
    with pytest.raises(NonFiniteError, match=r"The weight of layer '2' \(2.weight\) holds NaN or Inf"):
        conv_memory.directions(torch.randn(1, 3, 8, 8), mask)
    with pytest.raises(NonFiniteError, match="holds NaN or Inf"):
        conv_memory.keys(torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        weight.copy_(saved)


def _eigh_directions(memory: LayerMemory, keys: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """The directions as computed with C^{-1/2} from a full eigendecomposition (the former method)."""
    evals, evecs = memory.eigh()
    inv_sqrt = (evecs * evals.rsqrt()) @ evecs.T
    z = (keys.double() @ inv_sqrt) * weights.double().sqrt()[:, None]
    return torch.linalg.svd(z, full_matrices=False)[2][:rank] @ inv_sqrt


@pytest.mark.parametrize("channels", [6, 64])
def test_cholesky_whitening_gives_the_eigh_directions_up_to_sign(channels):
    memory = LayerMemory(nn.Sequential(nn.Linear(channels, 3)), "0")
    mix = torch.randn(channels, channels, dtype=torch.float64) * torch.logspace(0, -3, channels, dtype=torch.float64)
    data = torch.randn(4 * channels, channels, dtype=torch.float64) @ mix.T
    memory.set_moment((data.T @ data / len(data)).float())
    keys, weights = torch.randn(40, channels) @ mix.T.float(), torch.rand(40) + 0.1
    d = memory.directions_from_keys(keys, weights, rank=3).double()
    reference = _eigh_directions(memory, keys, weights, 3)
    cosines = torch.nn.functional.cosine_similarity(d, reference, dim=1).abs()
    assert cosines.min() > 1 - 1e-4
    c_reg = memory.regularised_moment()
    torch.testing.assert_close(d @ c_reg @ d.T, torch.eye(3, dtype=torch.float64), atol=1e-4, rtol=0)
    # L⁻¹ whitens (L⁻¹ C L⁻ᵀ = I), and C⁻¹ k is a true solve.
    eye = torch.eye(channels, dtype=torch.float64)
    torch.testing.assert_close(memory.whiten(memory.whiten(c_reg).T), eye, atol=1e-8, rtol=0)
    torch.testing.assert_close(memory.solve_moment(keys.double()), torch.linalg.solve(c_reg, keys.double().T).T)
