"""A checkpoint resumes at the same step with the same model, optimizer and schedule state."""

import copy

import torch

from raysl.config import parse_config
from raysl.methods import get_method
from raysl.methods.base import describe_encoder
from raysl.train.checkpoint import load_checkpoint, restore_state, save_checkpoint
from raysl.train.optim import build_optimizer, build_scheduler


def _setup(seed: int = 0):
    cfg = parse_config({"data": {"uri": "/x"}, "model": {"image_size": 16},
                        "method": {"projector_hidden": 32, "projector_dim": 8, "predictor_hidden": 32},
                        "optim": {"name": "lars", "lr": 0.5, "warmup_steps": 2}, "train": {"steps": 10}})
    torch.manual_seed(seed)
    model = get_method("byol").build(cfg)
    opt = build_optimizer(model, cfg.optim, 8)
    sched = build_scheduler(opt, cfg.optim, 10)
    return cfg, model, opt, sched


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return {v: torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8) for v in ("view1", "view2")}


def _train(model, opt, sched, steps: range) -> list[float]:
    losses = []
    for step in steps:
        out = model(_batch(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step_update(step)
        model.on_step_end(step, 10)
        losses.append(float(out["loss"].detach()))
    return losses


def test_resume_continues_identically(tmp_path) -> None:
    cfg, model, opt, sched = _setup()
    _train(model, opt, sched, range(1, 4))
    save_checkpoint(tmp_path, method=model, encoder=model.encoder(), spec=describe_encoder(cfg),
                    optimizer=opt, scheduler=sched, step=3, counters={"seen": 24})
    reference = copy.deepcopy(model)
    ref_opt_state = copy.deepcopy(opt.state_dict())
    expected = _train(model, opt, sched, range(4, 7))

    _, fresh, fresh_opt, fresh_sched = _setup(seed=123)  # different init: everything must come from disk
    state = load_checkpoint(tmp_path)  # weights_only=True inside
    assert restore_state(state, method=fresh, optimizer=fresh_opt, scheduler=fresh_sched) == 3
    assert state["counters"] == {"seen": 24}
    for a, b in zip(reference.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    loaded = fresh_opt.state_dict()
    assert loaded["param_groups"] == ref_opt_state["param_groups"]
    for k, st in ref_opt_state["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(loaded["state"][k][name], v)
    resumed = _train(fresh, fresh_opt, fresh_sched, range(4, 7))
    assert resumed == expected


def test_checkpoint_has_safetensors_encoder(tmp_path) -> None:
    from raysl.models.files import load_encoder_dir

    _, model, opt, sched = _setup()
    spec = {"backbone": "resnet18", "cifar_stem": False, "image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}
    save_checkpoint(tmp_path, method=model, encoder=model.encoder(), spec=spec, optimizer=opt,
                    scheduler=sched, step=1, counters={})
    enc, loaded_spec = load_encoder_dir(tmp_path)
    assert loaded_spec == spec
    x = torch.randn(2, 3, 16, 16)
    model.encoder().eval()
    torch.testing.assert_close(enc(x), model.encoder()(x))
