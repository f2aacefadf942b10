"""ViT pruning: P-ViT, AP-ViT, CP-ViT and token merging (ToMe), with real speed-ups.

Pure scoring/selection functions live in :mod:`~nnlab.prune.cpvit`, :mod:`~nnlab.prune.tome`,
:mod:`~nnlab.prune.pvit` and :mod:`~nnlab.prune.apvit`; the code that runs or edits a ViT lives
in :mod:`~nnlab.prune.runners` (token methods) and :mod:`~nnlab.prune.slim` (P-ViT slimming).

What "pruning ratio" removes, per method
----------------------------------------
* **cp-vit**, **tome**, **ap-vit** (token methods): patch *tokens*. ratio = ``1 - mean over
  blocks of (patch tokens entering the block's MLP) / N`` (N patches, CLS never removed). So at
  ratio 0.5 the blocks process on average half of the patch tokens; FLOPs drop by about the
  same fraction. CP-ViT and ToMe remove/merge between a block's attention and its MLP; AP-ViT's
  agents remove tokens before the block they sit in front of. Heads and widths are untouched.
* **p-vit**: *dimensions*. ratio = fraction of all gated units removed, pooled over the model:
  per block, the q/k/v dimensions of each head (one gate per dimension, shared by q, k, v and by
  all heads) and the MLP hidden units. One global threshold on the gate magnitudes; every block
  keeps at least one of each. The result is a smaller dense ViT (all tokens kept).

The ratio actually achieved is reported beside the target (``achieved_ratio``), since token counts
are integers and each method has a ceiling (ToMe merges at most half the tokens per block;
AP-ViT prunes only from its first agent on).
"""
