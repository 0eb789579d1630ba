"""Parity of both ONNX engines with eager torch on the real-size families, ResNet-18 and MobileNetV2.

On the portable and the ort-training engine, from the same initial weights (BatchNorm parameters
and statistics moved off init, tests.helpers.perturb_batchnorm), with float64 torch as the exact
reference next to float32 torch (`TorchEngine`):

- one step: the loss within 1e-4 of torch's, the BatchNorm running statistics within 1e-4, and
  every gradient within 1e-4 of torch's (max |a - b| / max |b|, the measure of
  tests/exporters/test_portable.py) or, where float32 itself is further than that from exact
  (torch's own float32 error there is the measure: the deep nets' BatchNorm backward cancels
  terms; at full size torch is up to 6 % off exact on MobileNetV2's last 1x1 conv, measured),
  within 10x torch's error from exact. A wrong gradient formulation is off by order 1.
- 20 steps with random masks (MobileNetV2's blocks in the short net): the weights as close to
  exact float64 training as torch's float32 ones (the test's docstring says why not 1e-4 of torch).

Exporting these nets for the portable engine takes time (torch.export tracing a deep graph:
here 1-7 min per net under load, a thinner net no faster), so:

- every run: MobileNetV2's blocks in a short net (`stages=SHORT`: an expansion-1 block, a
  stride-2 expansion-6 block, a residual expansion-6 block) at half width;
- `slow`: both families at full depth, at reduced width (ResNet-18 width 8, MobileNetV2 x0.25),
  one step; and one export of each at full size (3x32x32), one step. No 20-step trajectories
  there: their late stages hold 4x4 and 2x2 maps, where one ReLU input within rounding of 0
  (2.7e-6 here) lands on the other side in ORT's kernels than in torch's and moves a gradient by
  percents (9 % on ResNet-18 w8's layers.5.conv2.weight at step 4, float32 torch on the exact
  side, both ONNX engines on the other), after which the float32 runs part, torch's as much.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting needs torch (host side)")

from edgecl.exporters import build_model, export  # noqa: E402
from edgecl.exporters.models import MOBILENETV2_STAGES  # noqa: E402
from edgecl.exporters.reference import TorchEngine  # noqa: E402
from edgecl.runtime import OptimizerConfig, open_engine  # noqa: E402
from tests.helpers import perturb_batchnorm, rel_err, rel_norm  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-4
FLOAT32_DRIFT = 3e-4  # float32 training's own distance from exact after 20 steps on MobileNetV2-short (SGD)
IN_SHAPE = (3, 16, 16)  # 16 -> 8 -> 4 -> 2: the last stage still convolves a 2x2 map
CLASSES = 10
SHORT = ((1, 16, 1, 1), (6, 24, 2, 2))  # at width_mult 0.5: 16 -> 8 channels, then 8 -> 16 stride 2, 16 -> 16 + input
# lr 0.003 with momentum 0.9 (tests/exporters/test_ort_training.py): at larger steps a ReLU6 input
# lands within float noise of its kink sooner and the float32 trajectories part
SGD = OptimizerConfig("sgd", lr=0.003, momentum=0.9, nesterov=True, weight_decay=5e-4)
ADAMW = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)
HAS_ORT_TRAINING = importlib.util.find_spec("onnxruntime.training") is not None

CASES = {  # id -> (family, kwargs)
    "mobilenetv2-short": ("mobilenetv2", {"width_mult": 0.5, "stages": SHORT}),
    "resnet18-w8": ("resnet18", {"width": 8}),
    "mobilenetv2-x0.25": ("mobilenetv2", {"width_mult": 0.25}),
}
SLOW = {"resnet18-w8", "mobilenetv2-x0.25"}
ENGINES = [pytest.param("portable"),
           pytest.param("ort-training", marks=[pytest.mark.ort_training, pytest.mark.skipif(
               not HAS_ORT_TRAINING, reason="onnxruntime-training is not installed here")])]
CASE_PARAMS = [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else [], id=c) for c in CASES]


def make(case: str, in_shape=IN_SHAPE):
    family, kwargs = CASES[case]
    return perturb_batchnorm(build_model(family, in_shape, CLASSES, seed=0, **kwargs))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(case, engine, optimizer) -> (ONNX engine, torch engine) from one export per case and engine."""
    exports = {}

    def get(case: str, engine: str, optimizer: OptimizerConfig):
        if (case, engine) not in exports:
            model = make(case)
            folder = tmp_path_factory.mktemp(f"{case}-{engine}") / "art"
            export(model, torch.randn(4, *IN_SHAPE), folder, engine=engine, masks="weights")
            exports[case, engine] = model, folder
        model, folder = exports[case, engine]
        return open_engine(folder, optimizer, threads=2), TorchEngine.from_artifacts(model, folder, optimizer)

    return get


def _batch(rng, n: int):
    x = rng.standard_normal((n, *IN_SHAPE), dtype=np.float32)
    return x, rng.integers(0, CLASSES, n)


def shift_invariant_biases(model) -> set[str]:
    """The biases whose gradient is 0 in exact arithmetic: MobileNetV2's linear bottlenecks.

    The BatchNorm closing an inverted-residual block feeds, through residual adds only (no
    nonlinearity), the next 1x1 conv and its BatchNorm, which in training mode subtracts the batch
    mean: a constant shift of the bottleneck, its bias, changes nothing. Torch and the engines
    return float noise there (~1e-8 of the largest gradient, against >= 1e-3 for every other one).
    """
    from edgecl.exporters.models import InvertedResidual

    return {f"{path}.conv.{len(m.conv) - 1}.bias" for path, m in model.named_modules()
            if isinstance(m, InvertedResidual)}


def float64_grads(model, x, y, w=None, t=None, v=None) -> dict:
    """Exact (float64) gradients of the engines' loss: sum_i w_i CE_i + sum_i v_i mean_j (logit_ij - t_ij)^2."""
    net = copy.deepcopy(model).double().train()
    n = len(y)
    w = np.full(n, 1.0 / n) if w is None else w
    logits = net(torch.from_numpy(x).double())
    loss = (torch.from_numpy(w).double() * torch.nn.functional.cross_entropy(logits, torch.from_numpy(y),
                                                                            reduction="none")).sum()
    if v is not None and v.any():
        mse = ((logits - torch.from_numpy(t).double()) ** 2).mean(dim=1)
        loss = loss + (torch.from_numpy(v).double() * mse).sum()
    loss.backward()
    return {k: p.grad.numpy() for k, p in net.named_parameters()}


KINK = 1e-5  # a ReLU / ReLU6 input this close to its kink (times its layer's median |input|) may round to either side
FLIPPED = 0.1  # what one such element moved the gradients upstream of it by: up to 5 % measured (module doc)


def upstream_of_kinks(model, x) -> set[str]:
    """The parameters used before the last ReLU / ReLU6 input that float64 puts within KINK of a kink.

    Float32 rounding (~1e-6 of the summands) can put such an input on the other side in one
    implementation and not in another: the derivative there flips, and every gradient upstream
    of it moves (ResNet-18, 3x32x32: one input 1.9e-6 from 0 at block 4's output, the next
    2.3e-5; the portable engine's 39 gradients upstream moved by 1e-3..5e-2, the 23 downstream
    matched exact to 1e-6). Forward order, from hooks on every module call.
    """
    net = copy.deepcopy(model).double().train()
    calls: list[tuple[str, object]] = []

    def on_activation(module, inputs, output):
        v = inputs[0]
        gap = v.abs() if isinstance(module, torch.nn.ReLU) else torch.minimum(v.abs(), (v - 6).abs())
        calls.append(("activation", bool((gap < KINK * v.abs().median()).any())))

    handles = []
    for path, m in net.named_modules():
        if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6)):
            handles.append(m.register_forward_hook(on_activation))
        elif any(True for _ in m.parameters(recurse=False)):
            names = {f"{path}.{n}" for n, _ in m.named_parameters(recurse=False)}
            handles.append(m.register_forward_hook(lambda *_, names=names: calls.append(("params", names))))
    with torch.no_grad():
        net(torch.from_numpy(x).double())
    for h in handles:
        h.remove()
    last = max((i for i, (kind, near) in enumerate(calls) if kind == "activation" and near), default=-1)
    return set().union(*(names for kind, names in calls[:last] if kind == "params"))


def assert_gradients_match(grads: dict, ref_grads: dict, exact: dict, model, x) -> None:
    """Every gradient within TOL of torch's, or within 10x torch's own float32 error from exact, or, upstream
    of a ReLU input rounding may flip (`upstream_of_kinks`), within FLIPPED of exact; the shift-invariant
    ones (and only they) exactly 0 and noise in both engines."""
    assert grads.keys() == ref_grads.keys()
    scale = max(float(np.abs(g).max()) for g in exact.values())
    zero = {k for k in ref_grads if np.abs(exact[k]).max() <= 1e-9 * scale}
    assert zero == shift_invariant_biases(model) & set(ref_grads), zero
    for k in zero:
        assert np.abs(grads[k]).max() <= 1e-6 * scale, k
    upstream = upstream_of_kinks(model, x)
    for k in sorted(set(ref_grads) - zero):
        if rel_err(grads[k], ref_grads[k]) <= TOL:
            continue
        error, torch_error = rel_err(grads[k], exact[k]), rel_err(ref_grads[k], exact[k])
        bound = FLIPPED if k in upstream else max(TOL, 10 * torch_error)
        assert error <= bound, (k, error, torch_error, "upstream of a kink" if k in upstream else "")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_loss_every_gradient_and_running_stats_match_torch(pair, rng, case, engine):
    eng, ref = pair(case, engine, SGD)
    for n in (2, 8):  # the batch dimension is dynamic
        x, y = _batch(rng, n)
        w = rng.uniform(0.5, 1.5, n).astype(np.float32) / n
        t = rng.standard_normal((n, CLASSES)).astype(np.float32)
        v = np.where(np.arange(n) % 2 == 0, 0.5, 0.0).astype(np.float32)
        loss, grads = eng.loss_and_grads(x, y, w, t, v)
        ref_loss, ref_grads = ref.loss_and_grads(x, y, w, t, v)
        assert rel_err(loss, ref_loss) <= TOL
        model = make(case)
        assert_gradients_match(grads, ref_grads, float64_grads(model, x, y, w, t, v), model, x)
    buffers = eng.buffers()
    for k, b in ref.buffers().items():  # BatchNorm running statistics follow torch's update
        assert rel_err(buffers[k], b) <= TOL, k


def _float64_run(model, masks: dict, optimizer: OptimizerConfig, batches) -> tuple[dict, object]:
    """The same training in float64 torch (weights masked, as TorchEngine masks them): the exact reference."""
    net = copy.deepcopy(model).double().train()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for k, m in masks.items():
            params[k].mul_(torch.from_numpy(m).double())
    c = optimizer
    opt = (torch.optim.SGD(net.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                           weight_decay=c.weight_decay) if c.kind.value == "sgd" else
           torch.optim.AdamW(net.parameters(), lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay))
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(x).double()), torch.from_numpy(y)).backward()
        for k, m in masks.items():  # what weight * mask in the forward gives the raw weight
            params[k].grad.mul_(torch.from_numpy(m).double())
        opt.step()
    return {k: v.detach().numpy() for k, v in params.items()}, net.eval()


@pytest.mark.parametrize("optimizer", [SGD, ADAMW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("engine", ENGINES)
def test_20_steps_with_masks_train_as_accurately_as_torch(pair, rng, engine, optimizer):
    """After 20 steps the engine's weights are as close to exact (float64) training as torch's float32
    ones: the worst weight's relative error within 3x torch's worst (or 1e-4).

    Not within 1e-4 of torch float32 as for the small families: on these deeper nets float32
    itself is further than that from exact after 20 steps (MobileNetV2, short: 2.8e-4 with SGD,
    4.5e-3 with AdamW, measured; an activation within rounding of a ReLU6 kink flips, momentum
    and Adam's per-element scaling carry it on), so 1e-4 between two float32 implementations is
    out of reach for either. A wrong gradient moves a weight far more (the one-step gradient test
    above holds each to 1e-4). The floor is that measured drift of float32 itself (3e-4), not 1e-4:
    ort-training with SGD measured 1.25e-4 on one weight (3.conv.0.weight) under the packages
    resolved on 2026-12-02, while torch's worst was 1.8e-5.
    """
    case = "mobilenetv2-short"
    eng, ref = pair(case, engine, optimizer)
    model = make(case)
    masks = {n: (rng.random(s) < 0.5).astype(np.float32) for n, s in eng.mask_shapes.items()}
    eng.set_masks(masks)
    ref.set_masks(masks)
    batches = [_batch(rng, 16) for _ in range(20)]
    for x, y in batches:
        eng.step(x, y)
        ref.step(x, y)
    exact, net64 = _float64_run(model, masks, optimizer, batches)
    params, ref_params = eng.parameters(), ref.parameters()
    errors = {k: rel_norm(params[k], exact[k]) for k in exact}  # per weight: the engine's, then torch's
    torch_errors = {k: rel_norm(ref_params[k], exact[k]) for k in exact}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= max(FLOAT32_DRIFT, 3 * max(torch_errors.values())), (worst, errors[worst],
                                                                         max(torch_errors.values()))
    for k, m in masks.items():
        assert (params[k][m == 0] == 0).all(), k
    x, _ = _batch(rng, 8)
    with torch.no_grad():
        logits = net64(torch.from_numpy(x).double()).numpy()
    assert rel_norm(eng.evaluate(x), logits) <= max(TOL, 3 * rel_norm(ref.evaluate(x), logits))


def test_the_short_net_has_every_kind_of_block():
    """The every-run case holds an expansion-1 block, a stride-2 block and a residual expansion-6 block."""
    from edgecl.exporters.models import InvertedResidual

    blocks = [m for m in make("mobilenetv2-short").modules() if isinstance(m, InvertedResidual)]
    depthwise = lambda b: next(m for m in b.conv if isinstance(m, torch.nn.Conv2d) and m.groups > 1)  # noqa: E731
    kinds = {(len(b.conv) == 5, b.residual, depthwise(b).stride) for b in blocks}  # 5 layers: no expansion conv
    assert kinds == {(True, False, (1, 1)), (False, False, (2, 2)), (False, True, (1, 1))}


def test_full_size_layouts_and_parameter_counts():
    """ResNet-18 (CIFAR layout) and MobileNetV2 (CIFAR strides) at 3x32x32: what the README names."""
    from edgecl.exporters.models import BasicBlock, InvertedResidual

    resnet = build_model("resnet18", (3, 32, 32), 10)
    mobilenet = build_model("mobilenetv2", (3, 32, 32), 10)
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962
    assert sum(p.numel() for p in mobilenet.parameters()) == 2_236_682
    assert len([m for m in resnet.modules() if isinstance(m, BasicBlock)]) == 8
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in resnet.modules())
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert [resnet.layers[i].conv1.out_channels for i in (0, 2, 4, 6)] == [64, 128, 256, 512]
    assert [resnet.layers[i].conv1.stride for i in (0, 2, 4, 6)] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    blocks = [m for m in mobilenet.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == sum(n for _, _, n, _ in MOBILENETV2_STAGES) == 17
    assert sum(b.residual for b in blocks) == 10  # stride 1 and channels matching: the paper's adds
    assert not any(isinstance(m, torch.nn.ReLU) for m in mobilenet.modules())
    shapes = []
    hook = lambda m, i, o: shapes.append(tuple(o.shape[2:]))  # noqa: E731
    for b in blocks:
        b.register_forward_hook(hook)
    mobilenet.eval()(torch.zeros(1, 3, 32, 32))
    assert sorted(set(shapes), reverse=True) == [(32, 32), (16, 16), (8, 8), (4, 4)]  # three stride-2 stages


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", ["resnet18", "mobilenetv2"])
def test_full_size_export_matches_torch(tmp_path, family, engine):
    """One export at full size (3x32x32, full width): loss and every gradient of one batch as torch's."""
    model = perturb_batchnorm(build_model(family, (3, 32, 32), CLASSES, seed=0))
    export(model, torch.randn(2, 3, 32, 32), tmp_path / "art", engine=engine, masks="weights")
    eng = open_engine(tmp_path / "art", SGD, threads=2)
    ref = TorchEngine.from_artifacts(model, tmp_path / "art", SGD)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 32, 32), dtype=np.float32), rng.integers(0, CLASSES, 4)
    loss, grads = eng.loss_and_grads(x, y)
    ref_loss, ref_grads = ref.loss_and_grads(x, y)
    assert rel_err(loss, ref_loss) <= TOL
    assert_gradients_match(grads, ref_grads, float64_grads(model, x, y), model, x)
