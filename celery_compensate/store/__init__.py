"""The saga store: one Redis hash per saga, advanced only by Lua commands.

==================  ======================================================
``layout``          every key and hash field, with the legend
``lua/``            one file per command (its KEYS, ARGV, replies and
                    transitions in its header), helpers in ``includes/``
``scripts``         reads, assembles and locates the Lua commands
``replies``         :class:`Reply`, every status a command answers with
``records``         what a read decodes a record into
``saga_store``      :class:`SagaStore`: sends the commands, reads records
==================  ======================================================
"""
from __future__ import annotations

from .layout import SHARDS, Keys, shard_of
from .records import (
    Listed, SagaRecord, SagaSummary, StepRecord, StepSummary,
)
from .replies import Reply
from .saga_store import (
    TRANSIENT_ERRORS, ChildReport, Outcome, SagaStore, UndoDue, make_client,
    new_token,
)

__all__ = ('SagaStore', 'Outcome', 'UndoDue', 'ChildReport', 'SagaRecord', 'StepRecord',
           'SagaSummary', 'StepSummary', 'Listed', 'Reply', 'Keys', 'SHARDS', 'shard_of', 'new_token',
           'make_client', 'TRANSIENT_ERRORS')
