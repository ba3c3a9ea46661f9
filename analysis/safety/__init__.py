"""Safety evaluation of a model (ASR, over-refusal, refusal / affirmative / utility NLL, utility accuracy,
optional judges).

``keywords``    refusal keyword lists (Qi et al., Arditi et al.) and ``is_refusal``
``generation``  batched greedy completions of chat contexts (left-padded, on the model's device)
``nll``         per-sample NLLs of refusals, affirmative prefixes and utility answers
``judge``       optional OpenAI-compatible judge: Qi et al.'s 1-5 rubric or the StrongREJECT rubric ([0, 1])
``guard``       optional local Llama-Guard-style classifier judge (safe / unsafe) from a model folder
``accuracy``    utility accuracy: final-number match (math), short-answer match (factual QA)
``results``     records -> metrics (``summarise``, with n and 95% intervals), ``EvalResult``, its run folder, the report
``compare``     two evaluations on the same prompts: exact McNemar + Newcombe interval on rates, paired bootstrap on NLLs
``estimate``    how long an evaluation takes here, from a short measured warm-up
``progress``    progress / cancel callbacks of the building blocks (``EvalCancelled``)
``evaluate``    the task ``EvalConfig`` (kind "evaluate": run_id, execute) and ``python -m analysis evaluate``
"""
