import pytest
import torch
import torchvision
from torch import nn

import dissect
from dissect.errors import LayerError
from dissect.hooks import Trace, TraceDict, get_module, key_module_name, layers


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_trace_reads_input_and_output_of_resnet_layer(resnet):
    x = torch.randn(2, 3, 64, 64)
    with Trace(resnet, "layer2.0.conv1", retain_input=True) as t:
        resnet(x)
    # The traced input must be what layer1 emits, and the output what conv1 computes from it.
    with torch.no_grad():
        expected_in = resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))
        expected_out = resnet.layer2[0].conv1(expected_in)
    torch.testing.assert_close(t.input, expected_in)
    torch.testing.assert_close(t.output, expected_out)
    assert _hook_count(resnet) == 0


def test_stop_gives_same_keys_as_full_pass(vgg):
    x = torch.randn(2, 3, 64, 64)
    with Trace(vgg, "features.6", retain_input=True) as full:
        y = vgg(x)
    assert y.shape == (2, 1000)
    ran_after = []
    handle = vgg.classifier.register_forward_hook(lambda *a: ran_after.append(1))
    try:
        with Trace(vgg, "features.6", retain_input=True, stop=True) as early:
            assert vgg(x) is None or True
    finally:
        handle.remove()
    assert not ran_after, "stop=True must end the forward before later layers run"
    torch.testing.assert_close(early.input, full.input, rtol=0, atol=0)


def test_edit_output_replaces_layer_output():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    with Trace(model, "1.0", edit_output=lambda out, name: torch.zeros_like(out)):
        y = model(x)
    torch.testing.assert_close(y, model[1][1].bias.expand(3, 2))


def test_nested_sequential_names_and_unknown_name_suggests():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 1))))
    assert isinstance(get_module(model, "0.1.0"), nn.Conv2d)
    with pytest.raises(KeyError) as err:
        get_module(model, "0.1.1")
    msg = str(err.value)
    assert "'0.1.0'" in msg and "named_modules" in msg


def test_unknown_name_in_resnet_lists_closest(resnet):
    with pytest.raises(KeyError, match="layer2.0.conv1"):
        Trace(resnet, "layer2.0.cnov1")


def test_hooks_removed_on_exception(resnet):
    class Boom(Exception):
        pass

    def edit(out, name):
        raise Boom()

    with pytest.raises(Boom):
        with Trace(resnet, "layer1.0.conv1", edit_output=edit):
            resnet(torch.randn(1, 3, 32, 32))
    assert _hook_count(resnet) == 0
    with pytest.raises(Boom):
        with TraceDict(resnet, ["layer1.0.conv1", "fc"], stop=True):
            raise Boom()
    assert _hook_count(resnet) == 0


def test_nested_traces_compose():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    x = torch.randn(2, 3)
    with Trace(model, "0", edit_output=lambda o, n: o + 1) as outer:
        with Trace(model, "0", edit_output=lambda o, n: o * 2) as inner:
            model(x)
    base = model[0](x)
    torch.testing.assert_close(outer.output, base + 1)
    torch.testing.assert_close(inner.output, (base + 1) * 2)


def test_grad_flows_through_edit_when_not_detached():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    delta = torch.zeros(3, requires_grad=True)
    with Trace(model, "0", edit_output=lambda o, n: o + delta, detach=False) as t:
        model(torch.randn(4, 3)).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert t.output.requires_grad
    with torch.no_grad(), Trace(model, "0") as t2:
        model(torch.randn(4, 3))
    assert not t2.output.requires_grad


def test_transformer_style_linear_stack():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in = nn.Linear(16, 32)
            self.fc_out = nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc_out(torch.relu(self.fc_in(x)))

    model = nn.Sequential(*[Block() for _ in range(3)])
    x = torch.randn(2, 5, 16)
    with TraceDict(model, ["0.fc_in", "2.fc_out"], retain_input=True) as td:
        model(x)
    assert td["0.fc_in"].input.shape == (2, 5, 16)
    assert td["2.fc_out"].output.shape == (2, 5, 16)
    infos = {i.name: i for i in layers(model, x)}
    assert infos["1.fc_in"].in_channels == 16 and infos["1.fc_in"].out_channels == 32
    assert infos["1.fc_in"].output_size == ()


def test_reused_module_records_every_call_and_stops_after_first():
    shared = nn.Linear(4, 4)
    calls = []

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            calls.append(1)
            return self.head(self.shared(self.shared(x)))

    model = Twice()
    x = torch.randn(2, 4)
    with Trace(model, "shared", retain_input=True) as t:
        model(x)
    assert len(t.outputs) == 2
    torch.testing.assert_close(t.inputs[1], t.outputs[0])
    torch.testing.assert_close(t.output, t.outputs[1])
    with Trace(model, "shared", stop=True) as t:
        model(x)
    assert len(t.outputs) == 1


def test_tracedict_stop_waits_for_all_layers():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    with TraceDict(model, ["1", "0"], stop=True) as td:
        model(torch.randn(1, 2))
    assert len(td["0"].outputs) == 1 and len(td["1"].outputs) == 1


def test_layers_on_resnet_and_composite_module(resnet):
    infos = layers(resnet, torch.randn(1, 3, 64, 64))
    by_name = {i.name: i for i in infos}
    assert by_name["conv1"].output_size == (32, 32)
    assert by_name["layer2.0.conv1"].in_channels == 64 and by_name["layer2.0.conv1"].kernel_size == (3, 3)
    assert by_name["fc"].type == "Linear"

    class Modulated(nn.Module):
        memory_key_module = "conv"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)

        def forward(self, x):
            return torch.relu(self.conv(x * 2))

    model = nn.Sequential(Modulated(), nn.ConvTranspose2d(6, 2, 4, stride=2, padding=1))
    infos = layers(model, torch.randn(1, 4, 8, 8))
    assert [i.name for i in infos] == ["0", "1"]
    assert infos[0].type == "Modulated" and infos[0].in_channels == 4 and infos[0].out_channels == 6
    assert infos[1].in_channels == 6 and infos[1].out_channels == 2 and infos[1].output_size == (16, 16)
    assert key_module_name(model, "0") == "0.conv" and key_module_name(model, "1") == "1"


def test_reading_before_forward_is_a_clear_error():
    model = nn.Linear(2, 2)
    with Trace(model, "", retain_input=False) as t:
        pass
    with pytest.raises(RuntimeError, match="retain"):
        t.input


def test_package_reexports():
    assert dissect.Trace is Trace and dissect.layers is layers


def test_layers_skip_grouped_convs_and_list_registered_types():
    from dissect.hooks import register_layer_type

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.weight.t()

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(4), Custom())
    model(torch.randn(1, 4, 5, 5))
    assert [i.name for i in layers(model, torch.randn(1, 4, 5, 5))] == ["2"]
    register_layer_type(Custom)
    assert [i.name for i in layers(model, torch.randn(1, 4, 5, 5))] == ["2", "3"]


def test_call_model_unpacks_tuples_and_dicts():
    from dissect.hooks import call_model, model_device, to_device

    class Two(nn.Module):
        def forward(self, a, b=0):
            return a + b

    assert call_model(Two(), (1, 2)) == 3 and call_model(Two(), {"a": 1, "b": 5}) == 6
    assert model_device(nn.Linear(1, 1)) == torch.device("cpu") and model_device(nn.ReLU()) == torch.device("cpu")
    moved = to_device({"x": [torch.zeros(1)]}, "cpu")
    assert moved["x"][0].device.type == "cpu"


def test_retained_tensors_are_copies_an_inplace_relu_cannot_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        emitted = model[0](x)
    assert emitted.min() < 0
    with torch.no_grad(), TraceDict(model, ["0", "1"], retain_input=True) as td:
        model(x)
    assert torch.equal(td["0"].output, emitted)  # not clamped by the in-place ReLU after it
    assert torch.equal(td["1"].input, emitted)  # what the ReLU received, before it changed it in place
    assert td["1"].output.min() == 0
    # Keeping the graph copies too: the copy still differentiates back to the weight.
    with Trace(model, "0", detach=False) as t:
        model(x)
    assert torch.equal(t.output.detach(), emitted) and t.output.grad_fn is not None
    t.output.sum().backward()
    assert model[0].weight.grad is not None


def test_layers_run_in_eval_mode_and_leave_every_buffer_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Dropout(0.5), nn.Conv2d(4, 3, 3, padding=1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    infos = layers(model, torch.randn(4, 8, 5, 5))
    assert [i.name for i in infos] == ["0", "4"] and infos[1].output_size == (10, 10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_layer_input_stops_before_the_layer_runs():
    from dissect.hooks import layer_input

    ran = []
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].register_forward_hook(lambda *a: ran.append(1))
    x = torch.randn(5, 3)
    with torch.no_grad():
        keys = layer_input(model, "2", x)
        torch.testing.assert_close(keys, torch.tanh(model[0](x)))
    assert not ran
    with pytest.raises(LayerError, match="does not run"):
        layer_input(_Twice(), "unused", torch.randn(2, 4))


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.shared(torch.relu(self.shared(x))))


def test_call_counts_and_single_call_check_name_the_layer_and_count():
    from dissect.hooks import call_counts, check_single_call

    model = _Twice()
    x = torch.randn(2, 4)
    assert call_counts(model, ["shared", "head", "unused"], x) == {"shared": 2, "head": 1, "unused": 0}
    check_single_call(model, ["head"], x)
    with pytest.raises(LayerError, match="Layer 'shared' runs 2 times in one forward"):
        check_single_call(model, ["head", "shared"], x)
    with pytest.raises(LayerError, match="Layer 'unused' does not run"):
        check_single_call(model, ["unused"], x)
    assert _hook_count(model) == 0
