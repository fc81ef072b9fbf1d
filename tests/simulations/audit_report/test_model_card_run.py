"""A real simulated run with patient groups: every number on its model card, recomputed
independently from the run's files.

The run is the session's ``audited_run`` (tests/conftest.py: two synthetic hospitals with
patient groups, exact evaluation by their ``site.toml``'s simulation opt-in, two DP rounds,
attributions on), which the privacy audit of tests/integration/test_audit.py reads too. The
test loads the final model (``final_model.pt``) and each site's files, predicts
every validation and test patient, and recomputes with scikit-learn and numpy what the card
shows: counts, the per-site and global test metrics, the calibration curve, every group's
metrics and largest gap (its own code for the decision threshold and for small-count
suppression), the feature attributions (integrated gradients by a plain-autograd Riemann
sum, clipped by hand), and each site's ε from its ledger's mechanisms with Google's
``dp_accounting``.
A pooled (global) number comes from 100-bin releases, so its AUROC is that of the scores
quantised to those bins.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from fedcare.client.accounting import independent_epsilon
from fedcare.client.data.loaders import load_site
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import predict
from fedcare.common.encoding import encoded_names, task_ehr_features
from fedcare.common.summary import load_summary
from fedcare.simulations.audit.model_card_cli import report_model
from tests.conftest import AUDITED_RUN_GROUP, AuditedRun
from tests.simulations.audit_report._dom import section_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.xdist_group(AUDITED_RUN_GROUP),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

TASK, K, FINE = "readmission", 10, 100
ATTRIBUTES = {"sex": ("F", "M"), "age_band": ((50.0, 70.0),)}


def _youden(y: np.ndarray, p: np.ndarray) -> float:
    """The bin edge k/100 maximising TPR - FPR, ties toward 0.5 (0.5 with one class)."""
    if y.min() == y.max():
        return 0.5
    edges = np.arange(FINE + 1) / FINE
    b = np.minimum(np.floor(p * FINE), FINE - 1)
    j = np.array([np.mean(b[y == 1] >= k) - np.mean(b[y == 0] >= k) for k in range(FINE + 1)])
    best = edges[j >= j.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])


def _hidden(counts: list[int]) -> set[int]:
    """Small-count suppression written out: below K, and the next smallest while the
    withheld ones hold between 1 and K - 1 patients together."""
    hidden = {g for g, n in enumerate(counts) if n < K}
    shown = sorted(set(range(len(counts))) - hidden, key=lambda g: counts[g])
    while shown and 0 < sum(counts[g] for g in hidden) < K:
        hidden.add(shown.pop(0))
    return hidden


def _group_of(values: list[object], attribute: str) -> np.ndarray:
    if attribute == "sex":
        return np.array([("F", "M").index(v) if v in ("F", "M") else 2 for v in values])
    ages = np.array([np.nan if v is None else float(v) for v in values])  # type: ignore[arg-type]
    return np.where(np.isnan(ages), 3, np.searchsorted([50.0, 70.0], ages, side="right"))


def _quantised(p: np.ndarray) -> np.ndarray:
    return np.minimum(np.floor(p * FINE), FINE - 1)


def _close(cell: str, value: float | None) -> bool:
    if value is None:
        return cell in ("—", "")
    return abs(float(cell) - value) <= 5e-4 + 1e-9


def _near(cell: str, value: float) -> bool:
    """Within the card's rounding and integrated gradients' quadrature error (32-point
    Gauss-Legendre at the site against a 300-step midpoint sum here): 1 %."""
    return abs(float(cell) - value) <= 5e-4 + 1e-2 * abs(value)


def _riemann_ig(model: torch.nn.Module, x: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Integrated gradients against a zero baseline by a midpoint Riemann sum."""
    total = torch.zeros_like(x)
    for k in range(steps):
        point = ((k + 0.5) / steps * x).detach().requires_grad_(True)
        model(point).sum().backward()
        assert point.grad is not None
        total += point.grad
    return x * total / steps


def test_every_number_on_a_real_runs_card_is_recomputed_from_its_files(
    audited_run: AuditedRun,
) -> None:
    root, run = audited_run.sites, audited_run.run
    assert audited_run.task == TASK
    report_model(run, None)
    page = (run / "model_card.html").read_text(encoding="utf-8")
    summary = load_summary(run / "summary.json")

    # Every site's patients, predicted by the final model.
    state = torch.load(run / "final_model.pt", weights_only=True)["state_dict"]
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]] = {}
    counts: dict[str, int] = {}
    for folder in sorted(root.glob("site-*")):
        site = load_site(folder)
        trainer = SiteTrainer(site=site, policy=SitePolicy(require_dp=False), ledger=None)
        task = trainer.task_data(TASK)
        net = trainer.build_model(TASK)
        net.load_state_dict(state)
        sid = site.spec.site_id
        counts[sid] = len(task.patient_ids.train)
        data[sid] = {}
        for split in ("val", "test"):
            y, p = predict(net, task.dataset(split), device=torch.device("cpu"))
            ids = list(task.patient_ids[split])
            assert site.ehr is not None
            groups = {
                "sex": _group_of(site.ehr["sex"].reindex(ids).tolist(), "sex"),
                "age_band": _group_of(site.ehr["age"].reindex(ids).tolist(), "age_band"),
            }
            data[sid][split] = (y.astype(float), p.astype(float), groups)

    # Data per site.
    rows = {r[0]: r for r in section_rows(page, "data")[1:]}
    for sid, splits in data.items():
        assert rows[sid][2:5] == [
            str(counts[sid]),
            str(len(splits["val"][0])),
            str(len(splits["test"][0])),
        ]

    # Performance: each site's exact metrics, and the global pooled (100-bin) ones.
    header, *body = section_rows(page, "performance")
    perf = {r[0]: dict(zip(header, r, strict=True)) for r in body}
    for sid, splits in data.items():
        y, p, _ = splits["test"]
        t = _youden(*splits["val"][:2])
        row = perf[f"global model on {sid}"]
        assert _close(row["auroc"], roc_auc_score(y, p)), (sid, row)
        assert _close(row["auprc"], average_precision_score(y, p))
        assert _close(row["brier"], float(np.mean((p - y) ** 2)))
        assert _close(row["threshold"], t)
        assert _close(row["accuracy"], float(np.mean((p >= t) == y)))
    y_all = np.concatenate([s["test"][0] for s in data.values()])
    p_all = np.concatenate([s["test"][1] for s in data.values()])
    vy = np.concatenate([s["val"][0] for s in data.values()])
    vp = np.concatenate([s["val"][1] for s in data.values()])
    threshold = _youden(vy, vp)
    row = perf["global model (federated)"]
    assert row["n"] == str(len(y_all))
    assert _close(row["auroc"], roc_auc_score(y_all, _quantised(p_all)))
    assert _close(row["brier"], float(np.mean((p_all - y_all) ** 2)))
    assert _close(row["threshold"], threshold)
    assert _close(row["accuracy"], float(np.mean((p_all >= threshold) == y_all)))

    # Calibration: ten bins of the pooled test patients.
    bins = np.minimum(np.floor(p_all * 10), 9).astype(int)
    expected = [
        (p_all[bins == b].mean(), y_all[bins == b].mean(), int((bins == b).sum()))
        for b in range(10)
        if (bins == b).sum() >= K  # bins of fewer than min-count patients are not shown
    ]
    shown = section_rows(page, "calibration")[1:]
    assert len(shown) == len(expected)
    for cells, (mean_p, observed, n) in zip(shown, expected, strict=True):
        assert _close(cells[1], mean_p) and _close(cells[2], observed) and cells[3] == str(n)

    # Groups: the sites' released groups pooled, at the global threshold; per-site gaps.
    tables = section_rows(page, "groups")
    for attribute, labels in (("sex", ("F", "M")), ("age_band", ("<50", "50-70", ">=70"))):
        n_groups = len(labels) + 1
        pooled: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for sid, splits in data.items():
            y, p, groups = splits["test"]
            g = groups[attribute]
            hidden = _hidden([int((g == k).sum()) for k in range(n_groups)])
            site_auroc = {}
            for k in range(n_groups):
                if k not in hidden:
                    pooled.setdefault(k, []).append((y[g == k], p[g == k]))
                    yk = y[g == k]
                    if k < n_groups - 1 and 0 < yk.sum() < len(yk):
                        site_auroc[k] = roc_auc_score(yk, _quantised(p[g == k]))
            gap_row = [r for r in tables if r[:2] == [sid, attribute]]
            if len(site_auroc) >= 2:
                gap = max(site_auroc.values()) - min(site_auroc.values())
                assert gap_row and _close(gap_row[0][2], gap), (sid, attribute)
        aurocs = {}
        for k, label in enumerate((*labels, "unknown")):
            cells = next((r for r in tables if r[0] == label), None)
            if k not in pooled:
                assert cells is None or label == "unknown"
                continue
            yk = np.concatenate([a for a, _ in pooled[k]])
            pk = np.concatenate([b for _, b in pooled[k]])
            assert cells is not None and cells[1] == str(len(yk)), (attribute, label)
            if 0 < yk.sum() < len(yk):
                aurocs[label] = roc_auc_score(yk, _quantised(pk))
                assert _close(cells[2], aurocs[label])
                assert _close(cells[3], float(np.mean(pk[yk == 1] >= threshold)))
                assert _close(cells[4], float(np.mean(pk[yk == 0] >= threshold)))
            assert _close(cells[6], float(pk.mean())) and _close(cells[7], float(yk.mean()))
            assert _close(cells[8], float(pk.mean() - yk.mean()))
        if len(aurocs) >= 2:
            gaps = [r for r in tables if r[0] == "largest gap"]
            assert any(_close(r[2], max(aurocs.values()) - min(aurocs.values())) for r in gaps)

    # Feature attributions: integrated gradients by a plain-autograd Riemann sum (not Captum)
    # over every site's test patients, grouped by schema feature, each patient's row clipped
    # to norm 2 by hand, pooled; per site the same over its own patients.
    per_site_rows: dict[str, np.ndarray] = {}
    names: list[str] = []
    for folder in sorted(root.glob("site-*")):
        site = load_site(folder)
        trainer = SiteTrainer(site=site, policy=SitePolicy(require_dp=False), ledger=None)
        net = trainer.build_model(TASK)
        net.load_state_dict(state)
        net.eval()
        x = trainer.task_data(TASK).test.tensors[0]  # type: ignore[attr-defined]
        attributions = _riemann_ig(net, x).abs().detach().numpy()
        task_spec = site.spec.task(TASK)
        features = task_ehr_features(site.spec.feature_schema, task_spec)
        columns = [f.name for f in features for _ in encoded_names(f)]
        names = list(dict.fromkeys(columns))
        rows_ = np.stack([attributions[:, [c == n for c in columns]].sum(axis=1) for n in names], 1)
        norms = np.linalg.norm(rows_, axis=1, keepdims=True)
        per_site_rows[site.spec.site_id] = rows_ * np.minimum(1.0, 2.0 / np.maximum(norms, 1e-300))
    pooled_rows = np.vstack(list(per_site_rows.values()))
    expected_global = dict(zip(names, pooled_rows.mean(axis=0), strict=True))
    header, *shown_rows = section_rows(page, "explanation")
    assert header == ["Feature", "global", *sorted(per_site_rows)]
    cut = shown_rows.index(["Modality", "share"])  # the second table: shares by modality
    shown_rows, shares = shown_rows[:cut], shown_rows[cut + 1 :]
    assert shares == [["ehr", "1"]] or shares == [["ehr", "1.000"]], shares
    assert 0 < len(shown_rows) <= 20
    shown_global = [float(r[1]) for r in shown_rows]
    assert shown_global == sorted(shown_global, reverse=True)
    for cells in shown_rows:
        name = cells[0].removeprefix("ehr:")
        assert _near(cells[1], expected_global[name]), (name, cells)
        for j, sid in enumerate(sorted(per_site_rows)):
            own = per_site_rows[sid][:, names.index(name)].mean()
            assert _near(cells[2 + j], own), (sid, name, cells)
    ranked = sorted(expected_global, key=lambda n: -expected_global[n])
    assert {r[0].removeprefix("ehr:") for r in shown_rows[:3]} <= set(ranked[:5])

    # Privacy: the lifetime ε of each site's ledger, recomputed with dp_accounting's PLD.
    privacy = {r[0]: r for r in section_rows(page, "privacy")[1:]}
    for site in summary.sites:
        ledger = PrivacyLedger(run / "state" / site.site_id / "ledger.sqlite")
        (dataset,) = ledger.summary()
        mechanisms = [c.mechanism for c in ledger.charges_affecting(dataset.fingerprint)]
        pld = independent_epsilon(mechanisms, delta=1e-5)
        shown_epsilon = float(privacy[site.site_id][3])
        assert pld - 2e-3 <= shown_epsilon <= pld + 0.02 + 2e-3, (site.site_id, pld)
