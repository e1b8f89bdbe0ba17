"""Training methods: what loss a batch contributes. Adversarial methods (PGD-AT, fast AT, TRADES, MART, each
optionally with SLIM) reuse the one loop in `loop.py` and the one attack in `nenni_deploy.attacks`."""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD, Objective, ce_objective, feature_objective, features, straight_through
from ..errors import NenniError
from ..models.stages import block_outputs
from ..nenni.layers import nenni_layers


@runtime_checkable
class Method(Protocol):
    """`loss` returns the scalar to minimise and the logits that training accuracy is read from.

    It is called with the model in training mode; a method that crafts inputs may switch modes inside, and
    must leave the model as it found it. `to_dict` (optional) records the method's settings with checkpoints.
    """

    name: str

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Standard:
    """Plain cross-entropy on the (augmented) clean batch."""

    label_smoothing: float = 0.0
    name: str = "standard"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_record(method: Method) -> dict[str, Any]:
    """The method's settings as stored in last.json; a resume refuses a different record."""
    to_dict = getattr(method, "to_dict", None)
    # Through JSON so that tuples compare equal to the lists a saved record reads back as.
    return json.loads(json.dumps(dict(to_dict()))) if callable(to_dict) else {"name": method.name}


# -- adversarial training -----------------------------------------------------------------------------------
ADVERSARIAL = ("pgd", "fast", "trades", "mart")
METHODS = ("standard", *ADVERSARIAL)
VIAS = ("nenni", "exact", "approx")  # how the attack differentiates a NENNI model: its own forward, or BPDA


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper: attacks must not run DDP's gradient machinery."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block (batch norm uses running stats and does not update them), then each module's
    own previous mode: a NENNI fine-tune keeps frozen batch norms in eval mode even while training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def resolve_slim_layers(
    model: nn.Module, patterns: tuple[str, ...] | list[str], input_shape: tuple[int, ...] | None = None
) -> list[str]:
    """Module names matching any of the fnmatch patterns, in model order; 'auto': the blocks the model's stages are
    built of (residual blocks), found by running it once on `input_shape` images."""
    if list(patterns) == ["auto"]:
        if input_shape is None:
            raise NenniError("SLIM's automatic layers need the input shape")
        names = block_outputs(model, input_shape)
    else:
        modules = [n for n, _ in model.named_modules() if n]
        names = [n for n in modules if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in modules)]
        if unmatched:
            raise NenniError(f"--slim-layers: no layer matches {', '.join(unmatched)} (see `nenni info` for names)")
    if not names:
        raise NenniError("SLIM needs at least one intermediate layer; none found (name them with --slim-layers)")
    return names


@dataclass
class Adversarial:
    """Adversarial training: craft x' with PGD (through the one attack implementation), train on it.

    name: 'pgd' (Madry et al.: cross-entropy on x'), 'fast' (the same with one FGSM step of 1.25 eps from a
    random start, Wong et al. 2020), 'trades' (Zhang et al.: CE(x) + beta * KL(p(x) || p(x')), the attack
    maximising the KL term), 'mart' (Wang et al.: boosted CE on x' + beta * KL weighted by 1 - p_y(x)).
    TRADES starts its attack from a uniform point of the ball (PGD's random start), not the paper's
    0.001-scaled Gaussian: the KL gradient vanishes at x itself, and either start moves off it.

    `slim_layers` non-empty turns on SLIM (method.md section 2): per batch one layer l and lambda ~ U(-1, 1)
    are drawn and the attack maximises L_outer + lambda * (1 - cos(f_l(x), f_l(x'))), clean features detached.
    `via` chooses how a NENNI model is differentiated while attacking: through its own forward pass ('nenni')
    or with BPDA through the exact layers or the approximators. The attack runs with batch norm in eval mode;
    its seed, the SLIM layer and lambda come from torch's global RNG, which checkpoints save and restore.
    """

    name: str = "pgd"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = 2 / 255
    beta: float = 6.0
    slim_layers: tuple[str, ...] = ()
    via: str = "nenni"

    def __post_init__(self) -> None:
        self.slim_layers = tuple(self.slim_layers)
        if self.name not in ADVERSARIAL:
            raise NenniError(f"unknown adversarial method {self.name!r}; choose {', '.join(ADVERSARIAL)}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and 0 < self.eps <= 1):
            raise NenniError(f"--eps must be in (0, 1] (images are in [0, 1]; 8/255 is usual), got {self.eps}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and 0 < self.alpha <= 1):
            raise NenniError(f"--attack-alpha must be in (0, 1], got {self.alpha}")
        if self.steps < 1:
            raise NenniError(f"--attack-steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise NenniError(f"--beta must be >= 0, got {self.beta}")
        if self.via not in VIAS:
            raise NenniError(f"--attack-via must be one of {', '.join(VIAS)}, got {self.via!r}")
        self.attack()  # PGD validates the rest

    @property
    def slim(self) -> bool:
        return bool(self.slim_layers)

    def attack(self, seed: int = 0) -> PGD:
        return PGD(eps=self.eps, steps=self.steps, alpha=self.alpha, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_model(self, model: nn.Module) -> None:
        """Fail before training starts on settings the model cannot honour."""
        if self.via != "nenni" and not nenni_layers(unwrap(model)):
            raise NenniError(f"--attack-via {self.via} (BPDA) needs a NENNI model; this one has no NENNI layers")
        modules = dict(unwrap(model).named_modules())
        missing = [n for n in self.slim_layers if n not in modules]
        if missing:
            raise NenniError(f"SLIM layers not in the model: {', '.join(missing[:5])}")

    # -- the attack -------------------------------------------------------------------------------------------
    def _outer_objective(self, model: nn.Module, x: torch.Tensor) -> Objective:
        if self.name != "trades":
            return ce_objective
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)

        def kl(m: nn.Module, xa: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(m(xa), dim=1), p_clean, reduction="none").sum(1)

        return kl

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """x' for this batch (and what SLIM drew); `model` is unwrapped and put in eval mode here."""
        net = unwrap(model)
        seed = int(torch.randint(0, 2**62, (1,)))
        info: dict[str, Any] = {}
        via = straight_through(net, self.via) if self.via != "nenni" else nullcontext()
        with eval_mode(net), via:
            objective = self._outer_objective(net, x)
            if self.slim:
                layer = self.slim_layers[int(torch.randint(0, len(self.slim_layers), (1,)))]
                lam = float(torch.rand(()) * 2 - 1)
                objective = feature_objective(layer, features(net, x, layer), weight=lam, base=objective)
                info = {"layer": layer, "lambda": lam}
            x_adv = self.attack(seed).perturb(net, x, y, objective)
        return x_adv, info

    # -- the outer loss ---------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the adversarial logits: training accuracy is accuracy on the crafted examples."""
        x_adv, _ = self.perturb(model, x, y)
        if self.name in ("pgd", "fast"):
            logits = model(x_adv)
            return F.cross_entropy(logits, y), logits
        # One forward of clean and adversarial images together: DistributedDataParallel allows one forward per
        # backward, and batch norm then normalises both halves with the same batch statistics.
        both = model(torch.cat([x, x_adv]))
        clean, adv = both[: len(x)], both[len(x) :]
        if self.name == "trades":
            return trades_loss(clean, adv, y, self.beta), adv
        return mart_loss(clean, adv, y, self.beta), adv


def fast_at(eps: float = 8 / 255, alpha: float | None = None, **kwargs: Any) -> Adversarial:
    """FGSM with random start and step 1.25 eps (Wong et al. 2020)."""
    return Adversarial(name="fast", eps=eps, steps=1, alpha=1.25 * eps if alpha is None else alpha, **kwargs)


def trades_loss(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    robust = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return F.cross_entropy(clean, y) + beta * robust


def mart_loss(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART (Wang et al., ICLR 2020), as in the authors' code: the small constants are theirs."""
    adv_probs = F.softmax(adv, dim=1)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    clean_probs = F.softmax(clean, dim=1)
    true_probs = clean_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), clean_probs, reduction="none").sum(1)
    return boosted + beta * (kl * (1.0000001 - true_probs)).mean()


def make_method(
    name: str,
    *,
    eps: float = 8 / 255,
    steps: int | None = None,
    alpha: float | None = None,
    beta: float = 6.0,
    slim_layers: tuple[str, ...] | list[str] = (),
    via: str = "nenni",
    label_smoothing: float = 0.0,
) -> Method:
    """The method by name; adversarial defaults are method.md's (10 steps of 2/255; fast: 1 step of 1.25 eps)."""
    if name not in METHODS:
        raise NenniError(f"unknown method {name!r}; choose {', '.join(METHODS)}")
    if name == "standard":
        if slim_layers:
            raise NenniError("--slim needs an adversarial method (pgd, fast, trades or mart)")
        return Standard(label_smoothing=label_smoothing)
    if label_smoothing:
        raise NenniError("--label-smoothing applies to --method standard only")
    if name == "fast":
        if steps not in (None, 1):
            raise NenniError(f"--method fast takes one attack step, got --attack-steps {steps}")
        return fast_at(eps, alpha, beta=beta, slim_layers=tuple(slim_layers), via=via)
    # eps / 4 is 2/255 at 8/255: the usual ratio, kept for other budgets.
    alpha = eps / 4 if alpha is None else alpha
    steps = 10 if steps is None else steps
    return Adversarial(name, eps, steps, alpha, beta, slim_layers=tuple(slim_layers), via=via)


@dataclass
class MethodConfig:
    """The training method as a user chooses it (one field per `--method`-group option), checked on creation;
    `build` makes the Method for a model, `validators` the PGD validation that picks the best epoch."""

    method: str = "standard"
    eps: float | str = 8 / 255
    attack_steps: int | None = None
    attack_alpha: float | str | None = None
    beta: float = 6.0
    slim: bool = False
    slim_layers: str = "auto"  # comma-separated names or patterns; auto: the model's residual blocks
    attack_via: str = "nenni"
    val_pgd_n: int | None = None  # None: 500 for adversarial methods, 0 for standard
    val_pgd_steps: int = 10

    def __post_init__(self) -> None:
        from ..attacks.budget import parse_eps

        if self.method not in METHODS:
            raise NenniError(f"unknown method {self.method!r}; choose {', '.join(METHODS)}")
        if self.attack_via not in VIAS:
            raise NenniError(f"--attack-via must be one of {', '.join(VIAS)}, got {self.attack_via!r}")
        self.eps = parse_eps(self.eps, "linf", "--eps")
        if self.attack_alpha is not None:
            self.attack_alpha = parse_eps(self.attack_alpha, "linf", "--attack-alpha")
        if self.val_pgd_n is not None and self.val_pgd_n < 0:
            raise NenniError(f"--val-pgd-n must be >= 0, got {self.val_pgd_n}")
        if self.val_pgd_steps < 1:
            raise NenniError(f"--val-pgd-steps must be >= 1, got {self.val_pgd_steps}")

    @property
    def validation_images(self) -> int:
        if self.val_pgd_n is not None:
            return self.val_pgd_n
        return 500 if self.method != "standard" else 0

    def build(self, model: nn.Module, input_shape: tuple[int, ...], label_smoothing: float = 0.0) -> Method:
        slim_layers: list[str] = []
        if self.slim:
            patterns = [p.strip() for p in self.slim_layers.split(",") if p.strip()]
            slim_layers = resolve_slim_layers(model, patterns or ["auto"], tuple(input_shape))
        return make_method(
            self.method,
            eps=self.eps,
            steps=self.attack_steps,
            alpha=self.attack_alpha,
            beta=self.beta,
            slim_layers=slim_layers,
            via=self.attack_via,
            label_smoothing=label_smoothing,
        )

    def validators(self, x: torch.Tensor, y: torch.Tensor, config) -> list:
        """The PGD validator on the first images of the loop's own held-out split (same seed, same split)."""
        from .loop import split_indices
        from .validators import pgd_validator

        n = self.validation_images
        if not n:
            return []
        if config.val_split <= 0:
            raise NenniError("--val-pgd-n needs a validation split (--val-split > 0)")
        _, val_idx = split_indices(len(x), config.val_split, config.seed)
        val_idx = val_idx[:n]
        eps, steps = self.eps, self.val_pgd_steps
        attack = PGD(eps=eps, steps=steps, alpha=max(eps / 4, 2.5 * eps / steps))
        return [pgd_validator(x[val_idx], y[val_idx], attack, config.eval_batch_size, via=self.attack_via)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- knowledge distillation ---------------------------------------------------------------------------------
def output_shape(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The model's output shape for one image (eval mode, no gradient; the model's modes are kept)."""
    device = next(iter(model.parameters())).device
    with eval_mode(model), torch.no_grad():
        return tuple(model(torch.zeros(1, *input_shape, device=device)).shape[1:])


def check_teacher(student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...], *, what: str) -> None:
    """A teacher must map the same input to the same number of classes; anything else is a one-line error."""
    try:
        t_out = output_shape(teacher, input_shape)
    except Exception as exc:  # any architecture mismatch surfaces as some error in forward
        raise NenniError(f"teacher {what} does not run on {tuple(input_shape)} inputs ({type(exc).__name__})") from None
    s_out = output_shape(student, input_shape)
    if t_out != s_out:
        raise NenniError(f"teacher {what} outputs {t_out}, the model {s_out}: the class counts differ")


@dataclass
class Distill:
    """Knowledge distillation from a frozen teacher (Hinton et al. 2015), plus optional feature matching.

    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + feature_weight * mean over `feature_layers` of ||f_s - f_t||^2 / mean(f_t^2)
    The feature term compares the outputs of same-named modules (a NENNI layer against the teacher's exact
    layer): where the approximation departs from what the dense network computed.
    """

    teacher: nn.Module
    alpha: float = 0.9
    temperature: float = 4.0
    feature_weight: float = 0.0
    feature_layers: tuple[str, ...] = ()
    label_smoothing: float = 0.0
    teacher_name: str = "dense-base"
    name: str = "distill"

    def __post_init__(self) -> None:
        if not (0 <= self.alpha <= 1 and math.isfinite(self.alpha)):
            raise NenniError(f"--distill-alpha must be in [0, 1], got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise NenniError(f"--distill-temperature must be > 0, got {self.temperature}")
        if not (self.feature_weight >= 0 and math.isfinite(self.feature_weight)):
            raise NenniError(f"--distill-features must be >= 0, got {self.feature_weight}")
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.feature_weight and not self.feature_layers:
            raise NenniError("feature distillation needs layers to compare (the model has no NENNI layers)")
        missing = [n for n in self.feature_layers if not _has_module(self.teacher, n)]
        if missing:
            raise NenniError(f"teacher {self.teacher_name} has no layer {missing[0]!r} to match features at")

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        names = self.feature_layers if self.feature_weight else ()
        with _capture(self.teacher, names) as t_feats, torch.no_grad():
            t_logits = self.teacher(x)
        with _capture(unwrap(model), names) as s_feats:
            logits = model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        t = self.temperature
        student, target = F.log_softmax(logits / t, 1), F.log_softmax(t_logits / t, 1)
        kd = F.kl_div(student, target, log_target=True, reduction="batchmean")
        loss = (1 - self.alpha) * ce + self.alpha * t * t * kd
        if names:
            feat = [((s_feats[n] - t_feats[n]) ** 2).mean() / (t_feats[n] ** 2).mean().clamp_min(1e-8) for n in names]
            loss = loss + self.feature_weight * torch.stack(feat).mean()
        return loss, logits

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "teacher": self.teacher_name,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "feature_weight": self.feature_weight,
            "feature_layers": list(self.feature_layers),
            "label_smoothing": self.label_smoothing,
        }


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


@contextmanager
def _capture(model: nn.Module, names: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Outputs of the named submodules during the block's forward passes."""
    out: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o)) for n in names
    ]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def dense_base_teacher(model: nn.Module) -> nn.Module:
    """The converted model's dense base: a frozen deep copy with every NENNI layer in exact mode."""
    import copy

    teacher = copy.deepcopy(unwrap(model))
    for layer in nenni_layers(teacher).values():
        layer.mode = "exact"
        layer.run_ratio = None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
