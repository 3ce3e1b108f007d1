"""The worker: the composition root, the executor pipeline and the bot.

One lease, from the scheduler to its ActionResult: :mod:`.bot` (the session loop) hands it
to :mod:`.leases` (a thread per lease), which calls the :class:`~.executor.ActionExecutor`
that :mod:`.compose` stacked (metrics around health around :class:`~.executor.Executor`).
The executor loads and checks the Action and Command (:mod:`.action`), has the input root
staged (``reapi_worker.storage.staging``), runs it (``reapi_worker.sandbox``) and captures
the outputs into CAS (:mod:`.outputs`), stamping ``ExecutedActionMetadata`` as it goes.

:mod:`.cli` and :mod:`.commands` are the command line; :mod:`.config` the one settings
schema; :mod:`.compose` the only module that picks concrete classes.
"""
