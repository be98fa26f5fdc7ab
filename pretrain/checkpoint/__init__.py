"""Checkpoints of a pretraining run and the run folder that holds them.

Read in this order: `tags` (names, markers, manifests), `verify` (is a tag loadable), `run_folder` (the lock,
fresh-run refusal, metrics trimming, keep_last, FINISHED), `writer` (saving one tag), `resume` (choosing and
loading a tag), `reshard` (another world size / ZeRO stage), `manager` (the policy, behind load() / save()).
`ds_recovery` parses DeepSpeed's own files (pre-manifest tags, `pretrain.convert --from-shards`).
"""

from pretrain.checkpoint.tags import CheckpointSaveError, RunFolderError

__all__ = ["CheckpointSaveError", "RunFolderError"]
