"""Golden values for lorafold's DPO-family losses (src/dpo/loss.rs), produced by TRL itself.

Run from anywhere (it writes next to itself):

    /work/venv/bin/python tests/golden/dpo_losses.py

Output: ``tests/golden/dpo_losses.json``, read by ``tests/it/losses.rs``.

Inputs
------
Two fixed random batches ("a" and "b") of B = 6 preference pairs in float32: per-sequence
SUMS of response log-probs (policy and reference) and the scored token counts. The sums are
those of a per-token tensor (every scored token carries sum/len), so that TRL's own code can be
fed per-token log-probs and the gradient with respect to a sequence sum is the gradient with
respect to any one of its tokens.

The recorded values come from TRL's functions run in float64 on exactly those float32 inputs,
so they carry no float32 rounding of their own (a float32 run of TRL is off by up to ~1e-5
relative on gradients where two terms cancel, e.g. apo_down). ``loss_f32`` is the same TRL call
in float32, kept for reference.

Which TRL function produced what (TRL 1.16.0)
---------------------------------------------
* Reference-based losses ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair",
  "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
  "sigmoid_norm", "sft", and lists of them with ``loss_weights``): ``DPOTrainer._compute_loss``
  called unbound, with a stand-in ``self`` holding only the attributes it reads, a stand-in
  model whose output carries the per-token log-probs (plus the dummy entropy/logit fields the
  metric code reads), and ``precompute_ref_log_probs`` inputs for the reference sums.
  ``loss`` is its return value and the gradients come from ``loss.backward()``.
  ``per_pair`` comes from calling the same function on each pair alone (B = 1); it is left out
  where a pair's loss depends on the rest of the batch (aot, aot_unpaired: sorted; sft: a
  token mean over the batch).
  TRL 1.16 does not return per-pair rewards; it logs ``rewards/chosen`` = mean of
  ``beta * (logp - ref_logp)``. The script records those logged means and the per-pair values
  of that same expression.
* cDPO ("sigmoid" with label_smoothing > 0): TRL 1.16's "sigmoid" ignores ``label_smoothing``
  (older TRL used the conservative form -(1-e)logsig(bD) - e logsig(-bD)). lorafold keeps cDPO, and its
  golden values come from TRL's "aot" branch called on each pair alone: for B = 1 the sorts are
  identities and that branch is exactly the cDPO formula. The batch loss is the mean of these.
* rpo_alpha: TRL 1.16 dropped ``rpo_alpha``; older TRL added ``rpo_alpha * NLL`` with the NLL
  averaged over all chosen response tokens of the batch, which is 1.16's "sft" term. Those
  cases are ``DPOTrainer._compute_loss`` with ``loss_type=[..., "sft"]`` and weight rpo_alpha.
* "bco_pair": TRL 1.16 keeps no running mean of the rewards (older TRL subtracted a
  ``RunningMoments`` mean). Two consecutive calls (batch "a" then batch "b") are recorded; each
  is the stateless 1.16 value.
* "simpo": ``trl.experimental.cpo.CPOTrainer.cpo_loss`` (loss_type "simpo", alpha 0) on
  per-token MEAN log-probs, loss = ``losses.mean()`` (+ ``cpo_alpha * nll`` in the case that
  sets it, nll = mean over chosen response tokens, as CPO's cross-entropy).
  Rewards: the ``chosen_rewards``/``rejected_rewards`` it returns (beta * mean logps).
* "orpo": ``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss`` on per-token MEAN log-probs;
  loss = nll - losses.mean(), as ``get_batch_loss_metrics``. TRL's ORPO NLL runs over prompt and
  response tokens; lorafold only has response sums, so here (and in lorafold) the NLL is the
  mean over the chosen RESPONSE tokens. Rewards: those ``odds_ratio_loss`` returns.
"""

import json
import os
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import trl  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

HERE = Path(__file__).resolve().parent
B = 6
T = 1 + 12 + 2  # one prompt position, up to 12 response tokens, padding


def make_batch(seed):
    """Random float32 sums around -20..-5, references near them, lengths 3..12.

    Returns the per-token values (2B, T-1) in [chosen; rejected] order, the completion mask
    (2B, T), and the per-row sums/lengths, all as torch tensors."""
    g = torch.Generator().manual_seed(seed)
    sums = torch.empty(2 * B).uniform_(-20.0, -5.0, generator=g)
    lens = torch.randint(3, 13, (2 * B,), generator=g)
    # One chosen and one rejected response with a high mean log-prob (> -ln 2) so ORPO's
    # log(1 - p) takes both branches.
    sums[1], lens[1] = -5.0, 12
    sums[B + 4], lens[B + 4] = -6.0, 11
    ref = sums + torch.randn(2 * B, generator=g) * 4.0
    ref_pt = torch.zeros(2 * B, T - 1)
    pt = torch.zeros(2 * B, T - 1)
    cmask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        n = int(lens[i])
        pt[i, :n] = sums[i] / n
        ref_pt[i, :n] = ref[i] / n
        cmask[i, 1 : 1 + n] = 1
    # The sums lorafold receives are exactly the float32 row sums TRL will compute.
    sums = pt.sum(dim=1)
    ref_sums = ref_pt.sum(dim=1)
    # The batch must tell the losses apart: aot's two sorts must order the pairs differently
    # (else aot equals cDPO), and at beta 0.5 some pairs must sit on each side of hinge's
    # margin (|delta| > 2).
    pi, rf = sums[:B] - sums[B:], ref_sums[:B] - ref_sums[B:]
    delta = pi - rf
    assert not torch.equal(torch.argsort(pi), torch.argsort(rf)), seed
    assert (delta > 2).any() and (delta < 2).any() and (delta < -2).any(), (seed, delta)
    return {"pt": pt, "cmask": cmask, "sums": sums, "ref_sums": ref_sums, "lens": cmask.sum(dim=1).float()}


def widen(batch):
    """The same batch in float64: per-token values rebuilt from the float32 sums, so that TRL's
    formulas are evaluated without float32 rounding on exactly the inputs lorafold gets."""
    n = batch["cmask"][:, 1:].to(torch.float64)
    lens = n.sum(dim=1, keepdim=True)
    pt = batch["sums"].double()[:, None] / lens * n
    return {
        "pt": pt,
        "cmask": batch["cmask"],
        "sums": batch["sums"].double(),
        "ref_sums": batch["ref_sums"].double(),
        "lens": batch["lens"].double(),
    }


BATCHES = {}


def dual(fn, *args, **kwargs):
    """Run a case in float64 (the recorded values) and again in float32 (``loss_f32``: what
    TRL itself gets in a float32 run, for reference)."""
    c = fn(*args, **kwargs, dtype=torch.float64)
    c["loss_f32"] = fn(*args, **kwargs, dtype=torch.float32)["loss"]
    return c


def record_inputs(batch):
    s, r, n = batch["sums"], batch["ref_sums"], batch["lens"]
    return {
        "chosen_logps": s[:B].tolist(),
        "rejected_logps": s[B:].tolist(),
        "ref_chosen_logps": r[:B].tolist(),
        "ref_rejected_logps": r[B:].tolist(),
        "chosen_lengths": n[:B].tolist(),
        "rejected_lengths": n[B:].tolist(),
    }


class _Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def dpo_trainer_loss(batch, pairs, loss_types, weights, beta, label_smoothing=0.0, tau=0.05):
    """TRL 1.16 ``DPOTrainer._compute_loss`` on the given pairs.

    Returns (loss, grad wrt chosen sums, grad wrt rejected sums, logged metrics)."""
    rows = list(pairs) + [B + i for i in pairs]
    pt = batch["pt"][rows].clone().requires_grad_(True)
    cmask = batch["cmask"][rows]
    shift_mask = cmask[:, 1:]
    n = len(pairs)

    def fake_model(**kwargs):
        shape = shift_mask.shape
        return types.SimpleNamespace(
            log_probs=pt * shift_mask,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )

    fake_model.training = True
    this = types.SimpleNamespace(
        model=fake_model,
        accelerator=_Accel(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(weights),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref = batch["ref_sums"][rows]
    inputs = {
        "input_ids": torch.zeros(2 * n, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, T, dtype=torch.long),
        "completion_mask": cmask,
        "ref_chosen_logps": ref[:n],
        "ref_rejected_logps": ref[n:],
    }
    loss = DPOTrainer._compute_loss(this, fake_model, inputs, return_outputs=False)
    loss.backward()
    g = pt.grad
    # Every scored token of a row has the same gradient: the gradient wrt the row's sum.
    for i in range(2 * n):
        k = int(shift_mask[i].sum())
        assert torch.allclose(g[i, :k], g[i, 0].expand(k), rtol=1e-6, atol=1e-12), (loss_types, i)
    grad = g[:, 0]
    return loss.detach(), grad[:n], grad[n:], this._metrics["train"]


def trl_rewards(batch, beta):
    s, r = batch["sums"], batch["ref_sums"]
    return (beta * (s[:B] - r[:B])).tolist(), (beta * (s[B:] - r[B:])).tolist()


def case_dpo(name, batch_name, loss_types, weights, beta, label_smoothing=0.0, tau=0.05, rpo_alpha=None,
             per_pair=True, dtype=torch.float64):
    """A case computed by DPOTrainer._compute_loss. ``loss_types`` are TRL 1.16 names; the
    lorafold terms are given separately by the caller through ``name`` mapping below."""
    batch = BATCHES[dtype][batch_name]
    loss, gc, gr, metrics = dpo_trainer_loss(batch, range(B), loss_types, weights, beta, label_smoothing, tau)
    pp = None
    if per_pair:
        pp = [float(dpo_trainer_loss(batch, [i], loss_types, weights, beta, label_smoothing, tau)[0])
              for i in range(B)]
    cr, rr = trl_rewards(batch, beta)
    return {
        "name": name,
        "input": batch_name,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "discopop_tau": tau,
        "simpo_gamma": 0.5,
        "rpo_alpha": rpo_alpha,
        "trl_function": "trl.DPOTrainer._compute_loss",
        "trl_loss_type": list(loss_types),
        "trl_loss_weights": list(weights),
        "loss": float(loss),
        "per_pair": pp,
        "chosen_rewards": cr,
        "rejected_rewards": rr,
        "trl_logged_rewards_chosen": metrics["rewards/chosen"][0],
        "trl_logged_rewards_rejected": metrics["rewards/rejected"][0],
        "grad_chosen": gc.tolist(),
        "grad_rejected": gr.tolist(),
    }


def case_cdpo(batch_name, beta, eps, dtype=torch.float64):
    """cDPO: TRL's "aot" branch on each pair alone (see module docstring)."""
    batch = BATCHES[dtype][batch_name]
    rows = list(range(B))
    losses, gcs, grs = [], [], []
    for i in rows:
        loss, gc, gr, _ = dpo_trainer_loss(batch, [i], ["aot"], [1.0], beta, eps)
        losses.append(float(loss))
        # d(mean over B)/d(sum_i) = (d loss_i / d sum_i) / B
        gcs.append(float(gc[0]) / B)
        grs.append(float(gr[0]) / B)
    cr, rr = trl_rewards(batch, beta)
    return {
        "name": "sigmoid (cDPO)",
        "input": batch_name,
        "beta": beta,
        "label_smoothing": eps,
        "discopop_tau": 0.05,
        "simpo_gamma": 0.5,
        "rpo_alpha": None,
        "terms": [["sigmoid", 1.0]],
        "trl_function": "trl.DPOTrainer._compute_loss, loss_type 'aot', one pair per call",
        "trl_loss_type": ["aot"],
        "trl_loss_weights": [1.0],
        "loss": float(torch.tensor(losses, dtype=dtype).mean()),
        "per_pair": losses,
        "chosen_rewards": cr,
        "rejected_rewards": rr,
        "grad_chosen": gcs,
        "grad_rejected": grs,
    }


def mean_logps_leaf(batch):
    """Per-token leaf and the CPO/ORPO ``get_batch_logps(average_log_prob=True)`` means."""
    pt = batch["pt"].clone().requires_grad_(True)
    mask = batch["cmask"][:, 1:].to(pt.dtype)
    means = (pt * mask).sum(-1) / mask.sum(-1)
    # Cross-entropy over the chosen response tokens: the mean of -logp over those tokens.
    nll = -(pt[:B] * mask[:B]).sum() / mask[:B].sum()
    return pt, means[:B], means[B:], nll


def case_simpo(batch_name, beta, gamma, eps, cpo_alpha, dtype=torch.float64):
    batch = BATCHES[dtype][batch_name]
    pt, mc, mr, nll = mean_logps_leaf(batch)
    this = types.SimpleNamespace(alpha=0.0, accelerator=_Accel(), simpo_gamma=gamma, beta=beta,
                                 label_smoothing=eps, loss_type="simpo")
    losses, cr, rr = CPOTrainer.cpo_loss(this, mc, mr)
    loss = losses.mean() + cpo_alpha * nll
    loss.backward()
    g = pt.grad[:, 0]
    return {
        "name": "simpo",
        "input": batch_name,
        "beta": beta,
        "label_smoothing": eps,
        "discopop_tau": 0.05,
        "simpo_gamma": gamma,
        "rpo_alpha": cpo_alpha if cpo_alpha else None,
        "terms": [["simpo", 1.0]],
        "trl_function": "trl.experimental.cpo.CPOTrainer.cpo_loss (+ cpo_alpha * nll)",
        "loss": float(loss),
        "per_pair": losses.detach().tolist(),
        "chosen_rewards": cr.tolist(),
        "rejected_rewards": rr.tolist(),
        "grad_chosen": g[:B].tolist(),
        "grad_rejected": g[B:].tolist(),
    }


def case_orpo(batch_name, beta, dtype=torch.float64):
    batch = BATCHES[dtype][batch_name]
    pt, mc, mr, nll = mean_logps_leaf(batch)
    this = types.SimpleNamespace(beta=beta, accelerator=_Accel())
    losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(this, mc, mr)
    loss = nll - losses.mean()
    loss.backward()
    g = pt.grad[:, 0]
    return {
        "name": "orpo",
        "input": batch_name,
        "beta": beta,
        "label_smoothing": 0.0,
        "discopop_tau": 0.05,
        "simpo_gamma": 0.5,
        "rpo_alpha": None,
        "terms": [["orpo", 1.0]],
        "trl_function": "trl.experimental.orpo.ORPOTrainer.odds_ratio_loss; loss = nll - losses.mean()",
        "loss": float(loss),
        # Per pair: the shared NLL minus that pair's odds-ratio term (their mean is the loss).
        "per_pair": (nll - losses).detach().tolist(),
        "chosen_rewards": cr.tolist(),
        "rejected_rewards": rr.tolist(),
        "grad_chosen": g[:B].tolist(),
        "grad_rejected": g[B:].tolist(),
    }


# lorafold name -> (TRL 1.16 loss_type, whether label_smoothing applies, per-pair possible)
SINGLE = [
    ("sigmoid", "sigmoid", False, True),
    ("hinge", "hinge", False, True),
    ("ipo", "ipo", False, True),
    ("robust", "robust", True, True),
    ("exo_pair", "exo_pair", True, True),
    ("nca_pair", "nca_pair", False, True),
    ("bco_pair", "bco_pair", False, True),
    ("sppo_hard", "sppo_hard", False, True),
    ("aot", "aot", True, False),
    ("aot_pair", "aot_unpaired", True, False),
    ("apo_zero", "apo_zero", False, True),
    ("apo_down", "apo_down", False, True),
    ("discopop", "discopop", False, True),
    ("sigmoid_norm", "sigmoid_norm", False, True),
    ("sft", "sft", False, False),
]


def main():
    torch.manual_seed(0)
    batches = {"a": make_batch(1), "b": make_batch(2)}
    BATCHES[torch.float32] = batches
    BATCHES[torch.float64] = {k: widen(v) for k, v in batches.items()}
    cases = []
    for beta in (0.1, 0.5):
        for ours, theirs, smooth, per_pair in SINGLE:
            eps = 0.1 if smooth else 0.0
            c = dual(case_dpo, ours, "a", [theirs], [1.0], beta, eps, per_pair=per_pair)
            c["terms"] = [[ours, 1.0]]
            cases.append(c)
        # aot without label smoothing too
        c = dual(case_dpo, "aot", "a", ["aot"], [1.0], beta, 0.0, per_pair=False)
        c["terms"] = [["aot", 1.0]]
        cases.append(c)
        # discopop with another tau
        c = dual(case_dpo, "discopop", "a", ["discopop"], [1.0], beta, 0.0, tau=0.5)
        c["terms"] = [["discopop", 1.0]]
        cases.append(c)
        cases.append(dual(case_cdpo, "a", beta, 0.1))
        cases.append(dual(case_simpo, "a", beta, 0.5, 0.0, 0.0))
        cases.append(dual(case_simpo, "a", beta, 1.0, 0.1, 0.0))
        cases.append(dual(case_orpo, "a", beta))
        cases.append(dual(case_orpo, "b", beta))

        # Combinations (TRL's loss_type list + loss_weights).
        c = dual(case_dpo, "sigmoid+sft", "a", ["sigmoid", "sft"], [1.0, 0.5], beta, per_pair=False)
        c["terms"] = [["sigmoid", 1.0], ["sft", 0.5]]
        cases.append(c)
        c = dual(case_dpo, "mpo", "a", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], beta,
                     per_pair=False)
        c["terms"] = [["sigmoid", 0.8], ["bco_pair", 0.2], ["sft", 1.0]]
        cases.append(c)
        # rpo_alpha = 0.5 on sigmoid: TRL 1.16 spells it as an "sft" term with weight 0.5.
        c = dual(case_dpo, "sigmoid rpo_alpha", "a", ["sigmoid", "sft"], [1.0, 0.5], beta, rpo_alpha=0.5,
                     per_pair=False)
        c["terms"] = [["sigmoid", 1.0]]
        cases.append(c)
        # SimPO with CPO's NLL term (cpo_alpha = 0.5) = lorafold's rpo_alpha on simpo.
        cases.append(dual(case_simpo, "a", beta, 0.5, 0.0, 0.5))

    # bco_pair: two consecutive calls, batch a then batch b (stateless in TRL 1.16).
    bco = []
    for name in ("a", "b"):
        c = dual(case_dpo, "bco_pair", name, ["bco_pair"], [1.0], 0.1)
        c["terms"] = [["bco_pair", 1.0]]
        bco.append(c)

    out = {
        "generator": "tests/golden/dpo_losses.py",
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "batch_size": B,
        "inputs": {k: record_inputs(v) for k, v in batches.items()},
        "cases": cases,
        "bco_pair_consecutive": bco,
    }
    path = HERE / "dpo_losses.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({len(cases)} cases)")
    for c in cases:
        print(f"  {c['name']:<18} beta={c['beta']:<4} ls={c['label_smoothing']:<4} loss={c['loss']:.6f}")


if __name__ == "__main__":
    main()
