"""Single-pass multi-adapter forward against PEFT and float64 recomputation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_model, make_peft_model, model_inputs
from torch import nn

from composition import AdapterBank, Composer, GateError
from registry import AdapterError, AdapterShapeError, LoraAdapter, LoraModule, load_source


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three PEFT adapters per family, different seeds and ranks."""
    out = {}
    for family in FAMILIES:
        dirs = []
        for seed, r in ((1, 4), (2, 2), (3, 6)):
            d = tmp_path_factory.mktemp(f"{family}{seed}")
            make_peft_model(family, seed=seed, r=r, alpha=2 * r).save_pretrained(d)
            dirs.append(d)
        out[family] = dirs
    return out


def peft_with(family: str, dirs: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_model(family), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model.eval()


def batch(family: str, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1, 128, (rows, 6), generator=g)}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, 128, (rows, 4), generator=g)
    return inputs


@pytest.mark.parametrize("path", ["auto", "dense", "gathered"])
def test_single_adapter_forward_equals_peft(family: str, saved, path: str) -> None:
    peft = peft_with(family, saved[family][:1])
    inputs = model_inputs(family)
    with torch.no_grad():
        expected = peft(**inputs).logits
    model = build_model(family)
    composer = Composer.attach(model, [load_source(str(saved[family][0]))])
    with torch.no_grad(), composer.compose(torch.ones(2, 1), path=path):
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["dense", "gathered"])
def test_per_sample_selection_equals_peft_adapter_names(family: str, saved, path: str) -> None:
    peft = peft_with(family, saved[family])
    inputs = batch(family, 5)
    choice = ["a2", "a0", "a1", "a0", "a2"]
    with torch.no_grad():
        expected = peft(**inputs, adapter_names=choice).logits
    model = build_model(family)
    adapters = [load_source(str(d)) for d in saved[family]]
    composer = Composer.attach(model, adapters, names=["a0", "a1", "a2"])
    gates = composer.gates_for([{c: 1.0} for c in choice])
    with torch.no_grad(), composer.compose(gates, path=path):
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- layer-level oracles in float64 -----------------------------------------------------------


class OneLayer(nn.Module):
    def __init__(self, d_in: int = 12, d_out: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_adapters(n: int = 4, d_in: int = 12, d_out: int = 10) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(0)
    return [
        LoraAdapter(
            {
                "proj": LoraModule(
                    torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), alpha
                )
            },
            use_rslora=i == 2,
        )
        for i, (r, alpha) in enumerate([(2, 4.0), (3, 3.0), (4, 8.0), (1, 1.0)][:n])
    ]


def exact_delta(a: LoraAdapter) -> torch.Tensor:
    return a.delta("proj", torch.float64)


@pytest.mark.parametrize("path", ["dense", "gathered"])
def test_mixture_equals_float64_weighted_sum(path: str) -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    x = torch.randn(3, 5, 12)
    gates = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 1.0, 0.0, 0.0], [-0.7, 0.4, 0.0, 0.0]])
    expected = float64_mixture(model, adapters, x, gates)
    composer = Composer.attach(model, adapters)
    with torch.no_grad(), composer.compose(gates, path=path):
        got = model(x)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def float64_mixture(
    model: OneLayer, adapters: list[LoraAdapter], x: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    w64, b64 = model.proj.weight.double(), model.proj.bias.double()
    return torch.stack(
        [
            x[i].double()
            @ (w64 + sum(gates[i, j].double() * exact_delta(a) for j, a in enumerate(adapters))).T
            + b64
            for i in range(len(x))
        ]
    )


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("path", ["auto", "dense", "gathered"])
def test_adapters_after_the_last_used_are_left_out_exactly(path: str, tokens: int) -> None:
    """Gates on the first two of four adapters (ranks 2 and 3): every path works over those
    two only and still equals float64; `auto` builds no per-row factors for a decode step."""
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    x = torch.randn(3, tokens, 12)
    gates = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-0.7, 0.0, 0.0, 0.0]])
    composer = Composer.attach(model, adapters)
    composition = composer.prepare(gates, path=path, merge=False)
    with torch.no_grad(), composer.use(composition):
        got = model(x)
    torch.testing.assert_close(
        got.double(), float64_mixture(model, adapters, x, gates), atol=1e-5, rtol=1e-5
    )
    assert composer.stack_for("proj", composition.span).A_cat.shape[0] == 2 + 3
    built = ("proj", 3) in composition.cache  # per-row factors for 3 rows
    if path != "auto":
        assert built == (path == "gathered")
    elif tokens == 1:
        assert not built  # a decode step reads the two adapters' weights instead


@pytest.mark.parametrize("mode", ["mixture", "fusion"])
@pytest.mark.parametrize("distinct", [2, 4])
def test_repeated_rows_equal_each_row_alone_whether_or_not_built_once(
    distinct: int, mode: str
) -> None:
    """Six rows of `distinct` compositions: the factors are built once per distinct row only
    when at most a third are distinct (else every row builds its own); the same result."""
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    unique = torch.tensor(
        [[0.5, 0.0, 0.3, 0.2], [0.0, 1.0, 0.0, 0.0], [-0.7, 0.4, 0.0, 0.0], [0, 0, 0.6, 0.6]]
    )[:distinct]
    gates = unique[torch.arange(6) % distinct]
    x = torch.randn(6, 5, 12)
    composer = Composer.attach(model, adapters)
    with torch.no_grad():
        composition = composer.prepare(gates, mode=mode, path="gathered")
        with composer.use(composition):
            together = model(x)
        _, inverse = composition.distinct_rows(gates, torch.full((6,), mode == "fusion"))
        assert (inverse is not None) == (3 * distinct <= 6)
        for i in range(6):
            with composer.compose(gates[i : i + 1], mode=mode, path="gathered"):
                torch.testing.assert_close(together[i : i + 1], model(x[i : i + 1]))
    composer.detach()


def test_fusion_averages_parameters_per_sample() -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()[:2]
    x = torch.randn(2, 4, 12)
    gates = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    composer = Composer.attach(model, adapters)
    with torch.no_grad(), composer.compose(gates, mode="fusion"):
        got = model(x)
    for i in range(2):
        r = 3  # ranks padded to the largest
        A = sum(
            gates[i, j].double()
            * nn.functional.pad(
                a.modules["proj"].lora_A.double(), (0, 0, 0, r - a.modules["proj"].rank)
            )
            for j, a in enumerate(adapters)
        )
        B = sum(
            gates[i, j].double()
            * a.scaling("proj")
            * nn.functional.pad(a.modules["proj"].lora_B.double(), (0, r - a.modules["proj"].rank))
            for j, a in enumerate(adapters)
        )
        expected = model.proj(x[i]).double() + x[i].double() @ (B @ A).T
        torch.testing.assert_close(got[i].double(), expected, atol=1e-5, rtol=1e-5)


def test_per_token_gates_from_a_gate_module() -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    x = torch.randn(2, 3, 12)
    token_gates = torch.softmax(torch.randn(2, 3, 4), dim=-1)
    seen = []

    def gate(module: str, h: torch.Tensor) -> torch.Tensor:
        seen.append((module, tuple(h.shape)))
        return token_gates

    composer = Composer.attach(model, adapters)
    with torch.no_grad(), composer.compose(token_gate=gate):
        got = model(x)
    deltas = torch.stack([exact_delta(a) for a in adapters])  # (n, d_out, d_in)
    expected = model.proj(x).double() + torch.einsum(
        "btn,nod,btd->bto", token_gates.double(), deltas, x.double()
    )
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert seen == [("proj", (2, 3, 12))]


def test_same_composition_on_every_row_is_merged_and_restored_exactly() -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 2, 12)
    gates = torch.tensor([[0.2, 0.3, 0.0, 0.5]]).expand(4, 4)
    composer = Composer.attach(model, adapters)
    with torch.no_grad():
        with composer.compose(gates, path="dense"):
            dense = model(x)
        with composer.compose(gates):  # auto -> merged into the weights
            merged = model(x)
            assert not torch.equal(model.proj.base_layer.weight, before["proj.weight"])
    torch.testing.assert_close(merged, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(composer.detach().proj.weight, before["proj.weight"])


def test_attach_and_detach_leave_the_model_bit_identical(family: str, saved) -> None:
    model = build_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = dict(model.named_modules())
    inputs = model_inputs(family)
    with torch.no_grad():
        logits = model(**inputs).logits
    composer = Composer.attach(model, [load_source(str(d)) for d in saved[family]])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)  # attached, no gates: base model
        with composer.compose(torch.tensor([[0.5, 0.5, 0.0]]).expand(2, 3)):
            model(**inputs)
    composer.detach()
    assert dict(model.named_modules()).keys() == layers.keys()
    assert all(model.get_submodule(n) is m for n, m in layers.items() if n)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bfloat16_forward_is_close_to_float32(saved) -> None:
    adapters = [load_source(str(d)) for d in saved["llama"]]
    inputs = batch("llama", 3)
    gates = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5], [0, 0, 1.0]])
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model("llama").to(dtype)
        composer = Composer.attach(model, adapters)
        with torch.no_grad(), composer.compose(gates):
            outs.append(model(**inputs).logits.float())
    assert outs[1].dtype == torch.float32
    assert (outs[0] - outs[1]).abs().max() < 0.05 * outs[0].abs().max()


# -- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_batched_generation_equals_each_prompt_alone(family: str, saved) -> None:
    model = build_model(family)
    model.generation_config.pad_token_id = 0
    adapters = [load_source(str(d)) for d in saved[family]]
    composer = Composer.attach(model, adapters, names=["a0", "a1", "a2"])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (5, 3, 7, 4)]
    choice = [{"a0": 1.0}, {"a2": 1.0}, {"a1": 0.5, "a2": 0.5}, {"a0": 1.0}]
    width = max(len(p) for p in prompts)
    pad_left = family != "t5"
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if pad_left else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    kw = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad(), composer.compose(composer.gates_for(choice)):
        together = model.generate(input_ids=ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        with torch.no_grad(), composer.compose(composer.gates_for([choice[i]])):
            alone = model.generate(
                input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw
            )
        new_alone = alone[0, -6:] if family != "t5" else alone[0]
        new_together = together[i, -6:] if family != "t5" else together[i]
        assert torch.equal(new_alone, new_together), (i, new_alone, new_together)


# -- bad input ----------------------------------------------------------------------------------


def test_adapters_that_do_not_fit_the_model_name_module_and_shapes(saved) -> None:
    adapter = load_source(str(saved["llama"][0]))
    model = build_model("gpt2")
    with pytest.raises(AdapterShapeError, match=r"model\.layers\.0"):
        Composer.attach(model, [adapter])
    small = LoraAdapter({"proj": LoraModule(torch.randn(2, 5), torch.randn(10, 2), 2.0)})
    with pytest.raises(AdapterShapeError, match=r"proj: adapters have \(d_in, d_out\) = \(5, 10\)"):
        Composer.attach(OneLayer(), [small])


def test_bad_gates_are_refused() -> None:
    composer = Composer.attach(OneLayer(), layer_adapters())
    for bad, needle in [
        (torch.ones(2, 3), r"shape \(batch, 4\)"),
        (torch.ones(4), "shape"),
        (torch.tensor([[float("nan"), 0, 0, 0]]), "NaN"),
    ]:
        with pytest.raises(GateError, match=needle), composer.compose(bad):
            pass
    with pytest.raises(Exception, match="unknown adapter 'nope'"):
        composer.gates_for([{"nope": 1.0}])
    with pytest.raises(GateError, match="exactly one"), composer.compose():
        pass


def test_merged_block_refuses_nesting_and_detach_and_leaves_no_delta_behind() -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    before = model.proj.weight.clone()
    gates = torch.tensor([[0.2, 0.3, 0.0, 0.5]]).expand(3, 4)
    composer = Composer.attach(model, adapters)
    with torch.no_grad(), composer.compose(gates):  # one composition: merged
        with pytest.raises(AdapterError, match="do not nest"), composer.compose(gates):
            pass
        with pytest.raises(AdapterError, match="inside a compose"):
            composer.detach()
    assert torch.equal(composer.detach().proj.weight, before)


def test_gates_that_need_gradients_get_them_even_when_every_row_is_the_same() -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    composer = Composer.attach(model, adapters)
    gates = torch.tensor([[0.2, 0.3, 0.0, 0.5]], requires_grad=True)
    with composer.compose(gates.expand(3, 4)):  # grad on: never merged
        model(torch.randn(3, 2, 12)).square().sum().backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    with pytest.raises(GateError, match="gradients off"), composer.compose(gates, path="merged"):
        pass
    composer.detach()


def test_a_zero_gate_after_the_last_used_still_gets_its_gradient() -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    x = torch.randn(2, 3, 12)
    gates = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    with Composer.attach(model, adapters).compose(gates, path="dense"):
        model(x).square().sum().backward()
    gates64 = gates.detach().double().requires_grad_()
    float64_mixture(model, adapters, x, gates64).square().sum().backward()
    torch.testing.assert_close(gates.grad.double(), gates64.grad, atol=1e-3, rtol=1e-4)
    assert gates.grad[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("path", ["auto", "dense", "gathered"])
def test_a_module_no_adapter_in_the_span_has_gets_nothing(path: str) -> None:
    """Adapter 0 lacks `second`, and only adapter 0 is used: `second` stays the base layer."""
    torch.manual_seed(0)
    model = nn.Sequential(OneLayer(12, 12), OneLayer(12, 10))
    g = torch.Generator().manual_seed(1)

    def module(d_out: int) -> LoraModule:
        return LoraModule(torch.randn(2, 12, generator=g), torch.randn(d_out, 2, generator=g), 2.0)

    adapters = [
        LoraAdapter({"0.proj": module(12)}),
        LoraAdapter({"0.proj": module(12), "1.proj": module(10)}),
    ]
    x = torch.randn(2, 1, 12)
    first, second = model[0].proj, model[1].proj
    w = first.weight.double() + adapters[0].delta("0.proj", torch.float64)
    expected = (x.double() @ w.T + first.bias.double()) @ second.weight.double().T
    composer = Composer.attach(model, adapters)
    with torch.no_grad(), composer.compose(torch.tensor([[1.0, 0.0]] * 2), path=path, merge=False):
        got = model(x)
    torch.testing.assert_close(got.double(), expected + second.bias.double(), atol=1e-5, rtol=1e-5)


def test_mixture_and_fusion_rows_share_one_pass_and_equal_each_row_alone() -> None:
    torch.manual_seed(0)
    model, adapters = OneLayer(), layer_adapters()
    x = torch.randn(4, 3, 12)
    gates = torch.tensor(
        [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0], [1.0, 0.0, 0, 0]]
    )
    modes = ["fusion", "mixture", "fusion", "mixture"]
    composer = Composer.attach(model, adapters)
    with torch.no_grad():
        with composer.compose(gates, mode=modes):
            together = model(x)
        for i, m in enumerate(modes):
            with composer.compose(gates[i : i + 1], mode=m, path="gathered"):
                torch.testing.assert_close(together[i : i + 1], model(x[i : i + 1]))
        with composer.compose(gates[:1], mode="mixture"):  # row 0's gates, the other mode
            assert not torch.allclose(together[:1], model(x[:1]))
    composer.detach()


@pytest.mark.parametrize(
    "mode, path", [("mixture", "dense"), ("mixture", "gathered"), ("fusion", "gathered")]
)
def test_a_slot_bank_written_in_place_equals_a_built_bank(mode: str, path: str) -> None:
    """Slots of one rank, filled and overwritten in place, compose exactly as a bank built
    from the same adapters (fusion pads every rank to the slot rank, which adds zeros)."""
    torch.manual_seed(0)
    adapters = layer_adapters()
    x = torch.randn(2, 5, 12)
    gates = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]])
    model = OneLayer()
    with torch.no_grad():
        built = Composer.attach(model, [adapters[3], adapters[1], adapters[2]])
        with built.compose(gates, mode=mode, path=path):
            want = model(x)
        built.detach()
        bank = AdapterBank.slots(3, 4, {"proj": (12, 10)})
        for slot, a in enumerate(adapters[:3]):
            assert bank.fits_slot(a) is None
            bank.write_slot(slot, a)
        bank.write_slot(0, adapters[3])  # a page-out and page-in: only slot 0 changes
        paged = Composer(model, bank)
        with paged.compose(gates, mode=mode, path=path):
            got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "rank 4 is above" in AdapterBank.slots(1, 3, {"proj": (12, 10)}).fits_slot(adapters[2])


def test_a_slot_overwritten_keeps_nothing_of_its_previous_adapter() -> None:
    """Paging a lower-rank adapter that lacks a module into a used slot leaves that slot's
    padding and the missing module at zero; the other slots are untouched."""
    a, b, c = layer_adapters(3)
    wide = LoraAdapter({**c.modules, "other": c.modules["proj"]})
    bank = AdapterBank.slots(2, 4, {"proj": (12, 10), "other": (12, 10)})
    bank.write_slot(0, wide)
    bank.write_slot(1, a)
    before = {n: (s.A_pad[1].clone(), s.B_pad[1].clone()) for n, s in bank.modules.items()}
    bank.write_slot(0, b)  # rank 3, no "other"
    proj, other = bank.modules["proj"], bank.modules["other"]
    torch.testing.assert_close(proj.A_pad[0, :3], b.modules["proj"].lora_A)
    torch.testing.assert_close(proj.B_pad[0, :, :3], b.scaling("proj") * b.modules["proj"].lora_B)
    assert not proj.A_pad[0, 3:].any() and not proj.B_pad[0, :, 3:].any()
    assert not other.A_pad[0].any() and not other.B_pad[0].any()
    for n, s in bank.modules.items():
        assert torch.equal(s.A_pad[1], before[n][0]) and torch.equal(s.B_pad[1], before[n][1])
