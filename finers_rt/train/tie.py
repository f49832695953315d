"""Tied pointer: the in-model joint pointer's key and query ARE the attribute readouts.

Why: the training-only heads learn fast what the pointer needs (per image token, which
colours / shapes / patterns are painted there: `dense.DenseHead`; per question, which of them
it names: `dense.QueryHead`), while the in-model pointer, trained only by its token CE, has to
discover the same matching through its own key / query projections, and on a CPU budget it
does not (ninth and tenth rounds: joint CE 4.7 -> 3.1 over ~2,000 steps, region recall at the
colour-only level). A conjunction "red AND striped AND top-left" is a sum of per-field match
scores, which one dot product computes exactly when the key holds per-value log-odds and the
query holds the named values. So `--tie-weight` supervises slices of the pointer's OWN key and
query (nothing new in the exported graph besides the optional per-cell key terms):

- key dims [0, A): multi-label attribute logits of the token's cell (BCE, the dense labels);
  key dims [A, A + 9): the cell's 3x3 image region (BCE, one-hot; read from the per-cell key
  terms, `pointer.cell_key`, since the states themselves hardly know where they are);
  text tokens: attribute logits pushed to "nothing here" (BCE to 0), so they lose every match;
- query dims [0, A + 9) at the last prompt position and at the position that writes x1:
  TIE_SCALE x the indicator of the values the question names for its target and of the image
  region its description names (MSE). Other query dims are left to the token CE, and the
  token / axis CE do not train the tied dims (`PointerHead.tied_dims`: in training the
  pointer's attention reads them detached), or they bend the attribute meaning away (seen:
  key colour accuracy 0.27 in-run where the same states give 0.96 to a linear probe).
Then q . k / sqrt(D) = TIE_SCALE / sqrt(D) x (sum of the named values' log-odds), the score of
a conjunction, before the token CE has taught the pointer anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finers_rt.errors import InputError
from finers_rt.export.pointer import cell_key_terms
from finers_rt.synth.questions import REGION_PHRASE, REGIONS
from finers_rt.train import dense

NUM_ATTRIBUTES = len(dense.ATTRIBUTES)
NUM_REGIONS = len(REGIONS)
TIE_DIMS = NUM_ATTRIBUTES + NUM_REGIONS
TIE_SCALE = 6.0


def region_label(question: str) -> int:
    """Index in `REGIONS` of the image region the question's description names, -1 if none."""
    text = question.lower()
    for k, name in enumerate(REGIONS):
        if REGION_PHRASE[name] in text:
            return k
    return -1


def cell_regions(n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """[rows * cols] long: the 3x3 region index of every cell (raster order), by the cell's
    centre, as `questions.region_of` places object centres."""
    rows = (torch.arange(n_rows, device=device, dtype=torch.float32) + 0.5) / n_rows
    cols = (torch.arange(n_cols, device=device, dtype=torch.float32) + 0.5) / n_cols
    ri = (rows * 3).long().clamp(max=2)[:, None]
    ci = (cols * 3).long().clamp(max=2)[None, :]
    return (ri * 3 + ci).reshape(-1)


def check_head(head) -> None:
    if head is None or not getattr(head, "joint", False) or head.cell_key is None:
        raise InputError("--tie-weight ties the in-model joint pointer with per-cell keys: it "
                         "needs --model-class pointer --joint-pointer")
    if head.head_dim < TIE_DIMS:
        raise InputError(f"--tie-weight needs a pointer width >= {TIE_DIMS}, got {head.head_dim}")


def tied_parameters(head) -> list:
    """The in-model pointer parameters the tie supervises directly (key, query, per-cell key
    terms); `train gse|lpr --tie-weight` trains them at --head-lr, like the training-only heads."""
    return [*head.key.parameters(), *head.query.parameters(), head.cell_key]


def image_keys(head, states: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """states [rows * cols, H] (final normed, raster order) -> the pointer keys [N, D] the
    model computes for those image tokens (projection + per-cell terms)."""
    cells = torch.arange(n_rows * n_cols, device=states.device)
    where = torch.stack([cells % n_cols, cells // n_cols], dim=-1).to(torch.float32)
    return head.key(states) + cell_key_terms(head, where)


def key_loss(head, image_states: torch.Tensor, image_spans: torch.Tensor,
             image_grid_thw: torch.Tensor, cell_labels: torch.Tensor, merge: int,
             text_states: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images of: attribute BCE (scaled like `dense.attribute_loss`) on key dims
    [0, A) + region BCE (x 9 / 3) on [A, A + 9); plus, when given, the attribute BCE to 0 on
    the text tokens' keys. image_states [I, S, H]; text_states [N, H]."""
    losses = []
    for b, start, count, n_rows, n_cols in dense.image_grids(image_spans, image_grid_thw, merge):
        keys = image_keys(head, image_states[b, start:start + count], n_rows, n_cols)
        attr = dense.attribute_loss(keys[:, :NUM_ATTRIBUTES], cell_labels[b, :count])
        regions = F.one_hot(cell_regions(n_rows, n_cols, keys.device), NUM_REGIONS)
        where = F.binary_cross_entropy_with_logits(
            keys[:, NUM_ATTRIBUTES:TIE_DIMS], regions.to(keys.dtype)) * NUM_REGIONS / 3
        losses.append(attr + where)
    loss = torch.stack(losses).mean() if losses else image_states.sum() * 0
    if text_states is not None and text_states.shape[0]:
        zero_cell = torch.zeros(text_states.shape[0], 2, device=text_states.device)
        keys = head.key(text_states) + cell_key_terms(head, zero_cell)
        logits = keys[:, :NUM_ATTRIBUTES]
        loss = loss + dense.attribute_loss(logits, torch.zeros_like(logits))
    return loss


def query_targets(query_labels: torch.Tensor, region_labels: torch.Tensor) -> torch.Tensor:
    """query_labels [B, 3] (`dense.named_target_labels`, -1 = not named), region_labels [B]
    (-1 = none) -> [B, TIE_DIMS] float: TIE_SCALE at every named value."""
    out = torch.zeros(query_labels.shape[0], TIE_DIMS, dtype=torch.float32,
                      device=query_labels.device)
    for k, (_name, part) in enumerate(dense.ATTRIBUTE_GROUPS):
        named = query_labels[:, k] >= 0
        rows = named.nonzero(as_tuple=True)[0]
        out[rows, part.start + query_labels[rows, k]] = TIE_SCALE
    rows = (region_labels >= 0).nonzero(as_tuple=True)[0]
    out[rows, NUM_ATTRIBUTES + region_labels[rows]] = TIE_SCALE
    return out


def query_loss(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """states [B, H] (final normed, the positions whose query should match) -> MSE of the
    pointer query's dims [0, TIE_DIMS) to `targets`, in units of TIE_SCALE^2 x (dims / 3)."""
    q = head.query(states)[:, :TIE_DIMS]
    return F.mse_loss(q, targets.to(q.dtype)) * TIE_DIMS / 3 / TIE_SCALE ** 2
