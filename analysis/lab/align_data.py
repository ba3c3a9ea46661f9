"""Training data of the alignment recipe (:mod:`analysis.lab.align`): the borderline contrast prompts and
the safety / to-be-self-distilled sets, never drawn from an evaluation split."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analysis.lab.align import AlignSettings

BORDERLINE_PREFIX = "borderline-"


#: Harmless requests that *look* sensitive (violent verbs, drugs, weapons in games, history of wars...),
#: answered during training by the base model itself (self-distillation), so that refusal training does
#: not teach "trigger word -> refuse". Written for this recipe and disjoint from ``benign_sensitive``
#: (the over-refusal test set; tests/test_align.py checks that no prompt is shared). They cover similar
#: ground on purpose, as contrast data does (cf. XSTest-style borderline prompts), so over-refusal measured
#: on benign_sensitive is in-distribution for them: say so when you report it.
BORDERLINE_PROMPTS: tuple[tuple[str, str], ...] = (
    ("computing", "How do I stop a runaway background job in bash?"),
    ("computing", "How do I kill every process listening on port 8080?"),
    ("computing", "What does 'killing a child process' mean in operating systems?"),
    ("computing", "How do I hack together a quick script to rename 500 photos?"),
    ("computing", "How do I wipe a USB stick before giving it away?"),
    ("computing", "How do I purge old Docker images to free disk space?"),
    ("computing", "What is a buffer overflow, in simple terms?"),
    ("computing", "How do I terminate a stuck SSH session?"),
    ("photography", "How do I shoot sharp photos of birds in flight?"),
    ("photography", "What lens should I use to shoot street photography?"),
    ("photography", "How do I capture lightning in a photo safely?"),
    ("photography", "How do I shoot a time-lapse of clouds with my camera?"),
    ("cooking", "How do I fillet a salmon?"),
    ("cooking", "What's the best knife for chopping onions quickly?"),
    ("cooking", "How do I cure my own bacon at home?"),
    ("cooking", "How do I kill yeast on purpose when making unleavened bread?"),
    ("cooking", "How do I break down a whole pineapple?"),
    ("cooking", "How do I smash garlic with the flat of a knife?"),
    ("history", "Why did the Roman Empire attack Carthage?"),
    ("history", "How were cannons used in the Napoleonic Wars?"),
    ("history", "What happened during the storming of the Bastille?"),
    ("history", "Why did the Titanic sink so quickly?"),
    ("history", "How did the Mongols conquer so much territory?"),
    ("history", "What was the Manhattan Project?"),
    ("health", "How much paracetamol is safe to give a ten-year-old?"),
    ("health", "What should I do if someone is choking?"),
    ("health", "How do I treat a minor burn at home?"),
    ("health", "What are the symptoms of carbon monoxide poisoning?"),
    ("health", "How do vaccines train the immune system to fight viruses?"),
    ("health", "How do I safely remove a tick from my skin?"),
    ("games", "How do I defeat the final boss in Dark Souls?"),
    ("games", "What's the best way to ambush players in Fortnite?"),
    ("games", "How do I blow up the bridge in the Battlefield campaign?"),
    ("games", "In Among Us, how do I get away with being the impostor?"),
    ("gardening", "How do I kill slugs that are eating my lettuce?"),
    ("gardening", "How do I get rid of bindweed for good?"),
    ("gardening", "When should I prune my apple tree?"),
    ("gardening", "How do I poison-proof my garden for my cat?"),
    ("home_diy", "How do I knock down a non-load-bearing wall?"),
    ("home_diy", "How do I break up old concrete in my yard?"),
    ("home_diy", "How do I get rid of mice in my attic?"),
    ("home_diy", "How do I cut through a rusted bolt?"),
    ("sport", "How do I hit harder with my jab in kickboxing class?"),
    ("sport", "How do I attack the net in tennis?"),
    ("sport", "How do I score more often from penalty kicks in football?"),
    ("general", "What does it mean to 'kill it' at a job interview?"),
    ("general", "How do I destroy old documents that contain my bank details?"),
    ("general", "How do I break bad news to my team gently?"),
    ("computing", "How do I force quit a frozen app on a Mac?"),
    ("computing", "How do I delete all local git branches that were already merged?"),
    ("computing", "What is a denial-of-service attack and how do websites defend against it?"),
    ("computing", "How do I crash-test my web server with a load-testing tool?"),
    ("computing", "How do I shoot down a bad pull request politely in code review?"),
    ("computing", "How do I abort a rebase that went wrong?"),
    ("computing", "How do I destroy a Terraform stack I no longer need?"),
    ("computing", "How do I block ads on my home network?"),
    ("computing", "How do I exploit Python's list comprehensions to write shorter code?"),
    ("computing", "How do I execute a shell command from Node.js?"),
    ("photography", "How do I blow up a small photo for a poster without it looking blurry?"),
    ("photography", "How do I shoot a portrait against a bright window?"),
    ("photography", "What shutter speed freezes a hummingbird's wings?"),
    ("cooking", "How do I slaughter the onion-chopping time in half?"),
    ("cooking", "How do I beat butter and sugar until fluffy without a mixer?"),
    ("cooking", "How do I carve a roast turkey?"),
    ("cooking", "How do I torch the sugar on a creme brulee?"),
    ("cooking", "How do I shuck oysters without hurting myself?"),
    ("cooking", "How do I kill bacteria on a wooden chopping board?"),
    ("history", "Why did the Aztec Empire fall to the Spanish?"),
    ("history", "How did the Battle of Hastings change England?"),
    ("history", "What weapons did Viking warriors carry?"),
    ("history", "How was the Berlin Wall torn down?"),
    ("history", "Why was Archduke Franz Ferdinand shot?"),
    ("history", "What was the Blitz in London?"),
    ("health", "What is a safe amount of alcohol to drink in a week?"),
    ("health", "How do painkillers like morphine work in hospitals?"),
    ("health", "What should I do if my child swallows a battery?"),
    ("health", "How do I stop a nosebleed?"),
    ("health", "What is the lethal temperature for heatstroke, and how do I prevent it?"),
    ("health", "How do I get rid of a stubborn cough at night?"),
    ("games", "How do I snipe from long range in Battlefield?"),
    ("games", "How do I kill the Lich King in World of Warcraft?"),
    ("games", "How do I set traps for raiders in Rust?"),
    ("games", "In poker, how do I bluff convincingly?"),
    ("gardening", "How do I stop squirrels from raiding my bird feeder?"),
    ("gardening", "How do I kill the moss growing on my patio?"),
    ("gardening", "How do I chop down a small dead tree safely?"),
    ("home_diy", "How do I blast mould off a bathroom ceiling?"),
    ("home_diy", "How do I smash out old bathroom tiles?"),
    ("home_diy", "How do I pick the right drill bit for concrete?"),
    ("home_diy", "How do I remove a screw with a stripped head?"),
    ("sport", "How do I take down an opponent in wrestling practice?"),
    ("sport", "How do I kill the ball in volleyball?"),
    ("sport", "How do I shoot a better free throw in basketball?"),
    ("general", "How do I get revenge on my brother in a friendly prank war?"),
    ("general", "How do I crush my fear of public speaking?"),
)


SELF_DISTILLED = "(answered by the base model during alignment)"


def borderline_dataset():
    """BORDERLINE_PROMPTS as a Dataset; the placeholder response is never trained on (the base model's
    own answer is, see :func:`self_distill`)."""
    from analysis.llm.data import Dataset, Example

    examples = [Example.from_prompt(prompt, SELF_DISTILLED, id=f"{BORDERLINE_PREFIX}{i + 1:03d}", category=category, split="analysis")
                for i, (category, prompt) in enumerate(BORDERLINE_PROMPTS)]
    text = json.dumps(BORDERLINE_PROMPTS)
    return Dataset(name="align_borderline", examples=examples, source="analysis/lab/align.py:BORDERLINE_PROMPTS",
                   content_hash=hashlib.sha256(text.encode()).hexdigest())


def load_training_sets(settings: AlignSettings):
    """(safety refusals, prompts to self-distil) for training; never an eval split.

    The second set is the utility analysis split (subsampled to ``n_utility``), followed by
    :data:`BORDERLINE_PROMPTS` when ``settings.borderline``.
    """
    from analysis.llm.data import Dataset, load_any

    safety = load_any(settings.safety).split(settings.safety_split)
    if settings.refusal_keywords:
        from analysis.safety.evaluate import keyword_list

        lists = [keyword_list(name) for name in settings.refusal_keywords]
        kept = [ex for ex in safety if all(k.is_refusal(ex.response) for k in lists)]
        safety = Dataset(name=f"{safety.name}[refusal:{'+'.join(settings.refusal_keywords)}]", examples=kept,
                         source=safety.source, content_hash=safety.content_hash)
    if settings.n_safety is not None and settings.n_safety < len(safety):
        safety = safety.take(settings.n_safety, seed=settings.seed)
    utility = load_any(settings.utility).split(settings.utility_split)
    if settings.n_utility is not None and settings.n_utility < len(utility):
        utility = utility.take(settings.n_utility, seed=settings.seed)
    if settings.borderline:
        extra = borderline_dataset()
        utility = Dataset(name=f"{utility.name}+{extra.name}", examples=list(utility) + list(extra),
                          source=f"{utility.source} + {extra.source}",
                          content_hash=hashlib.sha256((utility.content_hash + extra.content_hash).encode()).hexdigest())
    return safety, utility

