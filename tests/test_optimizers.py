"""`optimizer="adamw_bf16"`: the update against torch's AdamW, unbiased stochastic rounding, the
sync-free skip and clip, state loading, config errors, and (on CUDA) bf16 storage."""
import pytest
import torch

from fm9g._io import ConfigError
from fm9g.models.config import FM9GConfig
from fm9g.models.fm9g import FM9GModel
from fm9g.training.config import TrainConfig
from fm9g.training.optimizers import AdamWBF16, AdamWMaster, round_stochastic

BF16_STEP = 2.0 ** -7  # bf16 keeps 8 significant bits: neighbours are |x| * 2^-7 apart at most


def _pair(shape=(300, 70), seed=0, **kw):
    torch.manual_seed(seed)
    w0 = torch.randn(shape).bfloat16().float()  # start from bf16 values, as a bf16 model would
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opts = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    opts.update(kw)
    return a, b, torch.optim.AdamW([a], **opts), AdamWBF16([b], chunk_elements=4096, **opts)


def test_one_update_is_torch_adamw_rounded_to_a_bf16_neighbour():
    a, b, oa, ob = _pair()
    g = torch.randn_like(a) * 0.01
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    exact = a.detach()
    lo = exact.bfloat16().float()  # the two bf16 neighbours of the fp32 result
    step = torch.where(lo == 0, torch.full_like(lo, 2.0 ** -133), lo.abs() * BF16_STEP)
    assert torch.equal(b.detach().bfloat16().float(), b.detach()), "weights stay exactly bf16"
    assert ((b.detach() - exact).abs() <= step * 1.01 + 1e-30).all()
    # the moments are the fp32 moments rounded to nearest bf16
    for key in ("exp_avg", "exp_avg_sq"):
        assert ob.state[b][key].dtype == torch.bfloat16
        assert torch.equal(ob.state[b][key], oa.state[a][key].bfloat16())


def test_rounding_is_unbiased_where_round_to_nearest_would_lose_every_update():
    x = torch.full((200_000,), 1.0 + 2.0 ** -10)  # a quarter of the way from 1 to the next bf16 value
    r = round_stochastic(x, torch.tensor(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert r.mean().item() == pytest.approx(x[0].item(), abs=3e-5)
    assert x.bfloat16().float().unique().tolist() == [1.0]  # nearest: the offset is gone
    inf = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = round_stochastic(inf, torch.tensor(0)).float()
    assert out[0] == float("inf") and out[1] == -float("inf") and out[2].isnan()

    # 50 steps of lr 1e-4 on weights of 1.0: each update is 1/80 of a bf16 step
    w = torch.nn.Parameter(torch.ones(100_000))
    ref = torch.nn.Parameter(torch.ones(100_000))
    o, r_opt = AdamWBF16([w], lr=1e-4, weight_decay=0.0), torch.optim.AdamW([ref], lr=1e-4, weight_decay=0.0)
    for _ in range(50):
        w.grad, ref.grad = torch.ones_like(w), torch.ones_like(ref)
        o.step()
        r_opt.step()
    assert w.detach().mean().item() == pytest.approx(ref.detach().mean().item(), abs=2e-5)
    assert ref.detach().mean().item() == pytest.approx(1 - 50e-4, abs=1e-6)


def test_many_steps_with_changing_clip_factors_track_torch_adamw():
    a, b, oa, ob = _pair(shape=(64, 64), seed=1)
    for i in range(40):
        g = torch.randn_like(a) * (0.5 + i % 3)
        coef = torch.tensor(1.0 + (i % 4))  # the engine's clip coefficient: gradients are divided by it
        a.grad, b.grad = g / coef, g.clone()
        ob.grad_scale = coef
        oa.step()
        ob.step()
    ob.grad_scale = None
    # each step rounds to a bf16 neighbour at random: the weights random-walk around torch's by
    # about sqrt(steps) x half a bf16 step, and no further (no drift)
    diff = a.detach() - b.detach()
    assert diff.norm() / a.detach().norm() < 2e-2
    assert diff.mean().abs() < 1e-3 * a.detach().abs().mean()
    assert ob.state[b]["step"].item() == 40


def test_found_inf_leaves_weights_moments_and_step_untouched():
    _, b, _, ob = _pair()
    b.grad = torch.randn_like(b)
    ob.step()
    before = (b.detach().clone(), ob.state[b]["exp_avg"].clone(), ob.state[b]["exp_avg_sq"].clone())
    b.grad = torch.randn_like(b)
    ob.found_inf = torch.tensor(1.0)
    ob.step()
    ob.found_inf = torch.tensor(0.0)
    assert torch.equal(b.detach(), before[0])
    assert torch.equal(ob.state[b]["exp_avg"], before[1]) and torch.equal(ob.state[b]["exp_avg_sq"], before[2])
    assert ob.state[b]["step"].item() == 1
    ob.step()
    assert ob.state[b]["step"].item() == 2 and not torch.equal(b.detach(), before[0])


def test_the_noise_depends_on_the_seed_and_the_state_dict_restores_it():
    a1, b1, _, o1 = _pair(seed=3)
    _, b2, _, o2 = _pair(seed=3)
    o2.seed = 1
    for p, o in ((b1, o1), (b2, o2)):
        p.grad = torch.full_like(p, 0.01)
        o.step()
    assert not torch.equal(b1.detach(), b2.detach())
    # a copy loaded from o1's state draws the same noise at the next step as o1 itself
    _, b3, _, o3 = _pair(seed=3)
    b3.data.copy_(b1.detach())
    o3.load_state_dict(o1.state_dict())
    assert o3.param_groups[0]["rounding_calls"] == 1
    for p, o in ((b1, o1), (b3, o3)):
        p.grad = torch.full_like(p, 0.02)
        o.step()
    assert torch.equal(b1.detach(), b3.detach())


def test_a_torch_adamw_state_loads_with_bf16_moments():
    a, b, oa, ob = _pair()
    a.grad = torch.randn_like(a)
    oa.step()
    ob.load_state_dict(oa.state_dict())
    st = ob.state[b]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["step"].item() == 1
    b.grad = torch.randn_like(b)
    ob.step()
    assert st["step"].item() == 2


def test_config_names_the_optimizer_choices_and_conflicts():
    with pytest.raises(ConfigError, match="optimizer.*adamw_bf16"):
        TrainConfig(model="tiny", optimizer="sgd")
    with pytest.raises(ConfigError, match="offload"):
        TrainConfig(model="tiny", optimizer="adamw_bf16", offload=True, engine="bmtrain")
    with pytest.raises(ConfigError, match='runs under the torch engine; with engine="bmtrain"'):
        TrainConfig(model="tiny", optimizer="adamw_bf16", engine="bmtrain", save=None)
    with pytest.raises(ConfigError, match='adamw_bf16 keeps its 8 bytes per parameter on the GPU'):
        TrainConfig(model="tiny", offload=True, optimizer="adamw_bf16", save=None)


def test_offload_trains_like_adamw_master_with_its_state_in_host_memory():
    """AdamWOffload (offload: true): the fp32 masters and moments on the CPU, streamed in chunks
    smaller than a bucket; the same losses and weights as AdamWMaster within fp32 rounding (the CPU
    fused AdamW against the chunk kernel), and a skipped step changes nothing."""
    from fm9g.models.config import FM9GConfig
    from fm9g.models.fm9g import FM9GModel
    from fm9g.training.offload_optimizer import AdamWOffload

    torch.manual_seed(0)
    ref = FM9GModel(FM9GConfig.from_name("tiny"))
    model = FM9GModel(FM9GConfig.from_name("tiny"))
    model.load_state_dict(ref.state_dict())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, compute_dtype=torch.float32)
    a = AdamWMaster(ref.parameters(), **kw)
    b = AdamWOffload(model.parameters(), chunk_elements=1000, **kw)
    assert b._buckets[0][0].exp_avg.device.type == "cpu"
    ids = torch.randint(0, ref.config.vocab_size, (2, 16))
    for step in range(3):
        for m, opt in ((ref, a), (model, b)):
            m(ids, labels=ids).loss.backward()
            opt.grad_scale = torch.tensor(2.0)
            opt.found_inf = torch.tensor(1.0 if step == 1 else 0.0)  # step 2 is skipped
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    assert float(b._buckets[0][0].step) == 2.0



@pytest.mark.parametrize("cls", ["AdamWMaster", "AdamWOffload"])
def test_initial_masters_start_exact_and_are_freed_as_taken(cls):
    """Parameters already rounded to bf16 (FSDP2's shards) with their fp32 values beside them: the
    masters start from the fp32 values exactly, and the optimizer empties the mapping as it takes
    each (the caller's fp32 copy is not held next to the optimizer's state: 30.7 GB for the 7B)."""
    from fm9g.training.offload_optimizer import AdamWOffload

    torch.manual_seed(0)
    full = [torch.randn(64, 32), torch.randn(32)]
    params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in full]
    initial = dict(zip(params, full))
    opt = {"AdamWMaster": AdamWMaster, "AdamWOffload": AdamWOffload}[cls](params, lr=1e-3, initial_masters=initial)
    assert initial == {}
    masters = opt._masters()
    for p, t in zip(params, full):
        assert torch.equal(masters[p].reshape(t.shape), t)
        assert torch.equal(p.data, t.to(torch.bfloat16))


@pytest.mark.gpu
def test_offload_on_cuda_streams_the_update_like_adamw_master():
    """AdamWOffload on a CUDA model: gradients fetched and weights sent back through pinned
    buffers on a side stream, many chunks per bucket (double-buffered): the fp32 masters match
    AdamWMaster's on the GPU within fp32 rounding, and the GPU's bf16 weights are the masters
    rounded (the update reached the weights the next forward reads)."""
    from fm9g.training.offload_optimizer import AdamWOffload

    torch.manual_seed(0)
    ref = FM9GModel(FM9GConfig.from_name("tiny")).cuda()
    model = FM9GModel(FM9GConfig.from_name("tiny")).cuda()
    model.load_state_dict(ref.state_dict())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, compute_dtype=torch.bfloat16)
    a = AdamWMaster(ref.parameters(), **kw)
    b = AdamWOffload(model.parameters(), chunk_elements=4096, **kw)
    bucket = b._buckets[0][0]
    assert bucket.master.device.type == "cpu" and bucket.weights.numel() > 8 * 4096
    before = bucket.weights.clone()
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), device="cuda")
    for step in range(3):
        for m, opt in ((ref, a), (model, b)):
            m(ids, labels=ids).loss.backward()
            opt.grad_scale = torch.tensor(0.5, device="cuda")
            opt.found_inf = torch.tensor(0.0, device="cuda")
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        if step == 0:  # the same gradients: the two updates differ by fp32 rounding only
            torch.testing.assert_close(bucket.master, a._buckets[0][0].master.cpu(), rtol=1e-5, atol=1e-6)
        assert torch.equal(bucket.weights.cpu(), bucket.master.to(torch.bfloat16)), step
    assert not torch.equal(bucket.weights, before)


def test_trainer_on_cpu_keeps_weights_on_the_bf16_grid_and_learns(tmp_path):
    from fm9g.training.trainer import Trainer
    from test_trainer import ToyLoader, _cfg

    cfg = _cfg(tmp_path, optimizer="adamw_bf16", train_iters=25, lr=1e-2, warmup_iters=0,
               lr_scheduler="constant", save=None)
    t = Trainer(cfg, loader=ToyLoader(fixed=True))
    assert isinstance(t.engine.optimizer, AdamWBF16)
    res = t.fit()
    assert res.losses[-1] < 0.6 * res.losses[0]
    for p in t.model.parameters():
        if p.requires_grad:
            assert torch.equal(p.detach().bfloat16().float(), p.detach().float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run `pytest -m gpu` on a GPU machine")
@pytest.mark.parametrize("optimizer", ["adamw_bf16", "adamw_master"])
def test_gpu_trains_bf16_weights_through_the_trainer(tmp_path, optimizer):
    """Both flat-buffer optimizers hold bf16 weights on the device and learn; ``adamw_bf16`` keeps
    bf16 moments there, ``adamw_master`` saves its fp32 masters (the weights are them rounded)."""
    from fm9g.training.trainer import Trainer
    from test_trainer import ToyLoader, _cfg

    cfg = _cfg(tmp_path, optimizer=optimizer, train_iters=30, lr=1e-2, warmup_iters=0,
               lr_scheduler="constant", device="cuda", save=None)
    t = Trainer(cfg, loader=ToyLoader(fixed=True))
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    res = t.fit()
    assert res.losses[-1] < 0.5 * res.losses[0]
    if optimizer == "adamw_bf16":
        states = list(t.engine.optimizer.state.values())
        assert states and all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg"].is_cuda for s in states)
        return
    sd = t.engine.model_state_dict()
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float32}
    for name, p in t.model.named_parameters():
        assert torch.equal(sd[name].to(torch.bfloat16), p.detach().cpu()), name


def test_the_compiled_update_matches_the_eager_one():
    """The kernel torch.compile builds on CUDA, built here for the CPU: the same weights and moments."""
    pytest.importorskip("torch._inductor")
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        pytest.skip("torch.compile on CPU needs a C compiler")
    a, b, _, _ = _pair(seed=5)
    ob = AdamWBF16([b], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, chunk_elements=4096, compile=True)
    oa = AdamWBF16([a], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, chunk_elements=4096, compile=False)
    for i in range(3):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
        oa.grad_scale = ob.grad_scale = torch.tensor(1.0 + i)
        oa.step()
        ob.step()
    diff = (a.detach() - b.detach()).abs()
    # fp32 rounding of the fused kernel may move a value across a rounding threshold: rare, one bf16 step
    assert (diff > 0).float().mean() < 1e-3
    assert torch.equal(oa.state[a]["exp_avg"].float().sign(), ob.state[b]["exp_avg"].float().sign())


def test_a_group_is_one_flat_buffer_updated_in_chunks_not_per_tensor(monkeypatch):
    """40 tensors: the update runs once per chunk of the group's flat buffers (the per-tensor kernels
    of the first version spent most of a 1.5B model's step launching): one for the 20 matrices, one
    for the 20 biases (one-dimensional parameters are bucketed apart, as FSDP2 keeps them whole on
    every rank); and matches the per-tensor optimizers' numerics."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(20)])  # 40 tensors, 5440 elements
    ref = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(20)])
    ref.load_state_dict(model.state_dict())
    opt = AdamWBF16(model.parameters(), lr=1e-3, chunk_elements=2048)
    matrices, biases = opt._buckets[0]
    for bucket in (matrices, biases):
        assert all(p.data.untyped_storage().data_ptr() == bucket.weights.untyped_storage().data_ptr()
                   for p in bucket.params)
    assert [p.dim() for p in matrices.params] == [2] * 20 and [p.dim() for p in biases.params] == [1] * 20
    calls = []
    real = opt._kernel(torch.device("cpu"))
    monkeypatch.setattr(opt, "_kernel", lambda dev: lambda *a: (calls.append(a[0].numel()), real(*a)))
    oa = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    x = torch.randn(8, 16)
    for _ in range(3):
        for m, o in ((model, opt), (ref, oa)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert calls == [2048, 2048, 1024, 320] * 3
    # backward's gradients landed in the views; zero_grad drops them, or zeroes in place and keeps them
    assert all(p.grad is not None and p.grad.data_ptr() >= b.grads.data_ptr() for b in (matrices, biases)
               for p in b.params)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None for p in model.parameters())
    assert matrices.grads.abs().sum() == 0 and biases.grads.abs().sum() == 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(ref.parameters(), model.parameters()):
        assert (a.detach() - b.detach()).abs().max() < 2e-2 * a.detach().abs().max()


def test_replaced_weights_and_gradients_are_adopted_and_none_counts_as_zero():
    a, b, _, ob = _pair(shape=(10, 10))
    c = torch.nn.Parameter(torch.ones(5))
    ob2 = AdamWBF16([b, c], lr=1e-2, weight_decay=0.0)
    b.data = torch.full((10, 10), 2.0)  # replaced: the step copies it into the buffer and re-points
    b.grad = torch.ones(10, 10)
    c.grad = None
    ob2.step()
    bucket = ob2._buckets[0][0]
    assert b.data.data_ptr() == bucket.weights.data_ptr()
    assert (b.detach() < 2.0).all() and torch.equal(c.detach(), torch.ones(5))  # zero gradient, no decay
    assert ob2.state[c]["step"].item() == 1 and torch.equal(ob2.state[c]["exp_avg"].float(), torch.zeros(5))


def test_a_state_with_the_wrong_parameter_count_is_refused():
    _, b, _, ob = _pair()
    other = AdamWBF16([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match=r"groups of \[2\] parameters, this optimizer \[1\]"):
        ob.load_state_dict(other.state_dict())


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_master_weights_follow_torch_adamw_and_the_compute_weights_round_them(compute):
    """``adamw_master``: the fp32 masters are torch's AdamW on the same gradients (clip factors and
    a skipped step included); the model's weights are the masters rounded to ``compute``."""
    torch.manual_seed(2)
    w0 = torch.randn(50, 40)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    opts = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    oa, ob = torch.optim.AdamW([a], **opts), AdamWMaster([b], compute_dtype=compute, chunk_elements=512, **opts)
    assert b.dtype == compute
    for i in range(12):
        g = torch.randn(50, 40)
        coef = torch.tensor(1.0 + i % 3)
        ob.grad_scale, ob.found_inf = coef, torch.tensor(float(i == 5))
        b.grad = g.to(compute)
        ob.step()
        if i != 5:  # torch's AdamW sees the same (rounded) gradient, divided by the same factor
            a.grad = g.to(compute).float() / coef
            oa.step()
    master = ob.master_state([("w", b)])["w"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, a.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(b.detach(), master.to(compute))
    for key in ("exp_avg", "exp_avg_sq"):
        assert ob.state[b][key].dtype == torch.float32
        torch.testing.assert_close(ob.state[b][key], oa.state[a][key], rtol=1e-5, atol=1e-9)
    assert ob.state[b]["step"].item() == 11
    # a torch AdamW state and fp32 weights load at full precision (the masters, not the rounded weights)
    oc = AdamWMaster([torch.nn.Parameter(torch.zeros(50, 40))], compute_dtype=compute, **opts)
    c = oc.param_groups[0]["params"][0]
    oc.load_state_dict(oa.state_dict())
    oc.load_master([("w", c)], {"w": a.detach()})
    assert torch.equal(oc.master_state([("w", c)])["w"], a.detach())
    assert torch.equal(oc.state[c]["exp_avg_sq"], oa.state[a]["exp_avg_sq"]) and oc.state[c]["step"].item() == 11


def test_adamw_and_adamw_master_states_resume_into_each_other():
    """A checkpoint of the default optimizer continues under ``adamw_master`` and back, with the
    same trajectory as staying on one (fp32 compute weights: the masters are the weights)."""
    torch.manual_seed(4)
    w0, grads = torch.randn(30, 20), [torch.randn(30, 20) for _ in range(6)]
    opts = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    def run(kinds):
        p = torch.nn.Parameter(w0.clone())
        state = None
        for kind, gs in zip(kinds, (grads[:3], grads[3:])):
            o = torch.optim.AdamW([p], **opts) if kind == "adamw" else AdamWMaster([p], compute_dtype=torch.float32, **opts)
            p = o.param_groups[0]["params"][0]
            if state is not None:
                o.load_state_dict(state)
            for g in gs:
                p.grad = g.clone()
                o.step()
            state = o.state_dict()
        return p.detach()

    ref = run(["adamw", "adamw"])
    torch.testing.assert_close(run(["adamw", "master"]), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(["master", "adamw"]), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [AdamWBF16, AdamWMaster])
def test_dropped_gradients_train_exactly_as_zeroed_buffers(cls):
    """zero_grad() drops the gradients; backward's new ones are tensors of their own until
    flat_grads() (or the step) copies them into the flat buffer in one multi-tensor copy. With two
    micro-batches and a parameter backward never reaches, the weights match bit for bit the
    zero-in-place path, and the gradient norm over the flat buffers is the per-tensor one."""
    def run(set_to_none):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        unused = torch.nn.Parameter(torch.ones(3))
        opt = cls([*model.parameters(), unused], lr=1e-2, weight_decay=0.0)
        buckets = opt._buckets[0]  # the matrices' and the vectors' (biases, ``unused``)
        inside = lambda t: any(b.grads.data_ptr() <= t.data_ptr() < b.grads.data_ptr() + b.grads.nbytes
                               for b in buckets)
        norms = []
        for step in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            assert all((p.grad is None) == set_to_none for p in model.parameters())
            for k in range(2):
                x = torch.randn(5, 8, generator=torch.Generator().manual_seed(10 * step + k))
                model(x.to(model[0].weight.dtype)).float().square().mean().backward()
            assert all(inside(p.grad) != set_to_none for p in model.parameters())
            per_tensor = torch.linalg.vector_norm(torch.stack(
                [p.grad.float().norm() for p in model.parameters()]))
            flat = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in opt.flat_grads()]))
            assert all(inside(p.grad) for p in model.parameters())  # copied in by flat_grads
            norms.append((per_tensor.item(), flat.item()))
            assert unused.grad is not None and unused.grad.abs().sum() == 0  # zeroed by flat_grads
            opt.step()
        return [p.detach().clone() for p in model.parameters()], norms

    dropped, n_dropped = run(True)
    zeroed, n_zeroed = run(False)
    assert all(torch.equal(a, b) for a, b in zip(dropped, zeroed))
    assert n_dropped == n_zeroed
    assert all(abs(a - b) <= 1e-6 * a for a, b in n_dropped)


@pytest.mark.parametrize("optimizer", ["adamw_master", "adamw_bf16"])
def test_the_engine_drops_flat_gradients_for_one_backward_and_zeroes_them_for_several(optimizer):
    """TorchEngine.zero_grad: after a one-micro-batch step adamw_master's gradients are dropped
    (copied in at the next step); after an accumulating step, and always for adamw_bf16 (the
    memory-saving one), they are zeroed in place (no second set of gradients during backward)."""
    from fm9g.training.torch_engine import TorchEngine

    torch.manual_seed(0)
    engine = TorchEngine(FM9GModel(FM9GConfig.from_name("tiny")), lr=1e-3, device="cpu", optimizer=optimizer)
    ids = torch.randint(0, 99, (1, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    engine.train_step([batch], 1e-3)
    if optimizer == "adamw_master":
        assert all(p.grad is None for p in engine.params)
    else:
        assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in engine.params)
    engine.train_step([batch, batch], 1e-3)
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in engine.params)
