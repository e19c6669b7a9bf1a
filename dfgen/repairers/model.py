"""The model repairer: a repair model, prompted with the image, the question, the reference answer and
the failed solution (``RepairEnv.template``), writes the repaired text, greedily. A prompt that would
not fit the repair model's context is rejected per rollout (never generated into garbage); an
output cut at the token budget is rejected as ``repair model hit max tokens``.
"""
from __future__ import annotations

from dfgen.repairers import Proposal, register_repairer


@register_repairer("model")
def propose(jobs: list, env) -> list[Proposal]:
    from dfgen.backends import Prompt, SamplingConfig
    from dfgen.images import decode_image
    from dfgen.policy import prompt_lengths

    if not jobs:
        return []
    prompts = [Prompt(env.template.format(question=row["question"], reference_answer=row["answer"],
                                          solution=row["rollouts"][i]["text"]),
                      decode_image(row["image"]) if row["image"] is not None else None) for row, i in jobs]
    fits = ([n + env.max_new_tokens <= env.ctx for n in prompt_lengths(env.gen.processor, prompts, env.batch_size)]
            if env.ctx else [True] * len(prompts))
    outs = iter(env.gen.generate([p for p, ok in zip(prompts, fits) if ok], [[0]] * sum(fits),
                                 SamplingConfig(temperature=0.0, max_new_tokens=env.max_new_tokens))
                if any(fits) else [])
    proposals = []
    for ok in fits:
        o = next(outs)[0] if ok else None
        cost = {"repair_samples": 1, "repair_gen_tokens": len(o.token_ids)} if o is not None else {}
        proposals.append(Proposal(None, "repair prompt too long for the repair model") if o is None else
                         Proposal(o.text, "", cost) if o.finish_reason == "stop" else
                         Proposal(o.text, "repair model hit max tokens", cost))
    return proposals
