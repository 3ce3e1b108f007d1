"""The worker: the composition root (CLI), the executor pipeline and the bot.

One Action flows through: :mod:`.action` (load and check Action + Command),
:mod:`.stager` (materialise the input root), ``reapi_worker.sandbox`` (run it),
:mod:`.outputs` (capture outputs into CAS), with :mod:`.executor` tying the phases
together and stamping ``ExecutedActionMetadata``.
"""
