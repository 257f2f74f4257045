"""What the learned verifier must beat, trained and scored on the same prompt-level splits.

(a) `draft_prob`: the draft's own probability of its token as the score (Hugging Face assisted
    generation's confidence rule, docs/references.md §2);
(b) `logistic_regression`: scikit-learn on the same numeric features (standardised hidden state and
    scalar features; the token id is left out: one-hot over the vocabulary is not a linear feature);
(c) `linear`: the paper's verifier, Linear(H, 1) over the hidden state alone (docs/references.md §1),
    trained with the MLP's loss, optimizer and best-epoch rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from sprinter.features import HIDDEN_PREV
from sprinter.train.data import TokenTable, loader
from sprinter.verifier import HIDDEN, Verifier

if TYPE_CHECKING:
    from sprinter.train.fit import TrainConfig

Scorer = Callable[[TokenTable, torch.Tensor], torch.Tensor]  # (table, rows (N,)) -> P(accept)-like scores (N,)


@torch.no_grad()
def score_rows(verifier: Verifier, table: TokenTable, features, label_rule: str, rows: torch.Tensor,
               batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(accept) (N,), 0/1 evaluation label (N,)) of `rows`, in row order."""
    verifier.eval()
    scores, labels = [], []
    for batch in loader(table, features, label_rule, rows, batch_size, shuffle=False):
        scores.append(torch.sigmoid(verifier(batch)))
        labels.append(batch["eval_label"])
    return torch.cat(scores), torch.cat(labels)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float, neg_weight: float) -> torch.Tensor:
    """BCE on hard or soft labels (N,), the accept part weighted by pos_weight, the reject part by neg_weight."""
    logits = logits.float()
    loss = -(pos_weight * labels * torch.nn.functional.logsigmoid(logits)
             + neg_weight * (1 - labels) * torch.nn.functional.logsigmoid(-logits))
    return loss.mean()


def fit_plain(verifier: Verifier, table: TokenTable, features, splits: dict, cfg: TrainConfig, *, neg_weight: float,
              auroc: Callable[[torch.Tensor, torch.Tensor], float]) -> Verifier:
    """A plain Adam loop (the linear baseline needs no Lightning): keeps the epoch with the best val AUROC. From
    `cfg` (the MLP's training options): the label rule, epochs, batch size, lr, pos_weight, patience and seed, and
    `progress`: a bar over the epochs with the time left (at most: `patience` may stop it sooner)."""
    from tqdm.auto import tqdm

    label_rule, patience, pos_weight = cfg.label_rule, cfg.patience, cfg.pos_weight
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(verifier.parameters(), lr=cfg.lr)
    train = loader(table, features, label_rule, splits["train"], cfg.batch_size, shuffle=True, seed=cfg.seed)
    best, best_state, waited = -1.0, None, 0
    for epoch in tqdm(range(cfg.epochs), desc="baseline: linear", unit="epoch", disable=not cfg.progress):
        verifier.train()
        train.sampler.set_epoch(epoch)
        for batch in train:
            loss = weighted_bce(verifier(batch), batch["label"], pos_weight, neg_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        score = auroc(*score_rows(verifier, table, features, label_rule, splits["val"]))
        if score > best:
            best, waited = score, 0
            best_state = {k: v.clone() for k, v in verifier.state_dict().items()}
        else:
            waited += 1
            if patience and waited >= patience:
                break
    verifier.load_state_dict(best_state, strict=True)
    return verifier.eval()


def numeric_matrix(verifier: Verifier, table: TokenTable, rows: torch.Tensor) -> torch.Tensor:
    """Standardised hidden state(s) and scalar features (N, H [+ H] + S), with the verifier's statistics."""
    hidden = (table.gather(HIDDEN, rows).float() - verifier.hidden_mean) / verifier.hidden_std
    parts = [hidden]
    if verifier.has_prev_layer:
        parts.append((table.gather(HIDDEN_PREV, rows).float() - verifier.hidden_prev_mean) / verifier.hidden_prev_std)
    if verifier.scalar_features:
        scalars = torch.stack([table.gather(f, rows).float() for f in verifier.scalar_features], dim=-1)
        parts.append((scalars - verifier.scalar_mean) / verifier.scalar_std)
    return torch.cat(parts, dim=-1)


def logistic_regression(verifier: Verifier, table: TokenTable, eval_column: str, train_rows: torch.Tensor, *,
                        max_rows: int, pos_weight: float, neg_weight: float, seed: int) -> Scorer:
    """Fit scikit-learn's LogisticRegression on (a sample of) the train rows; returns its P(accept) scorer."""
    from sklearn.linear_model import LogisticRegression

    if len(train_rows) > max_rows:
        pick = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed))[:max_rows]
        train_rows = train_rows[pick].sort().values
    x = numeric_matrix(verifier, table, train_rows).numpy()
    y = (table.gather(eval_column, train_rows) >= 0.5).long().numpy()
    model = LogisticRegression(max_iter=500, class_weight={0: neg_weight, 1: pos_weight})
    model.fit(x, y)
    return lambda t, rows: torch.from_numpy(
        model.predict_proba(numeric_matrix(verifier, t, rows).numpy())[:, 1]).float()


def verifier_scorer(verifier: Verifier, features, label_rule: str) -> Scorer:
    return lambda t, rows: score_rows(verifier, t, features, label_rule, rows)[0]


def draft_prob_scorer(t: TokenTable, rows: torch.Tensor) -> torch.Tensor:
    """Hugging Face's confidence rule: the draft's probability of its own token is the score."""
    return t.gather("draft_prob", rows).float()
