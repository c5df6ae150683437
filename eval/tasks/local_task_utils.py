"""Python hooks of the local (offline) lm-eval tasks, copied into the generated task directory.

The functions for HellaSwag, WinoGrande and COPA are verbatim copies of lm-eval 0.4.13's
``lm_eval/tasks/hellaswag/utils.py``, ``lm_eval/tasks/winogrande/preprocess_winogrande.py`` and
``lm_eval/tasks/super_glue/copa/utils.py`` (MIT licence, EleutherAI), so the prompts are the
upstream ones; ``tests/test_eval.py`` checks this against the installed lm-eval.
The ``mmlu_<subject>`` functions select one subject's rows of the subject-tagged MMLU files.
"""
import re

import datasets

# --- HellaSwag (lm_eval/tasks/hellaswag/utils.py) ----------------------------------------------


def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out_doc = {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }
        return out_doc

    return dataset.map(_process_doc)


# --- WinoGrande (lm_eval/tasks/winogrande/preprocess_winogrande.py) ------------------------------


def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


# --- COPA (lm_eval/tasks/super_glue/copa/utils.py) -----------------------------------------------


def convert_choice(choice):
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc):
    # Drop the period
    connector = {
        "cause": "because",
        "effect": "therefore",
    }[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_doc_to_target(doc):
    correct_choice = doc["choice1"] if doc["label"] == 0 else doc["choice2"]
    # Connect the sentences
    return " " + convert_choice(correct_choice)


def copa_doc_to_choice(doc):
    return [" " + convert_choice(doc["choice1"]), " " + convert_choice(doc["choice2"])]


# --- MMLU: one task per subject, as upstream (lm_eval/tasks/mmlu/_generate_configs.py) ----------

MMLU_SUBJECTS = {  # subject -> upstream category group
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem", "high_school_us_history": "humanities",
    "high_school_world_history": "humanities", "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities", "logical_fallacies": "humanities",
    "machine_learning": "stem", "management": "other", "marketing": "other", "medical_genetics": "other",
    "miscellaneous": "other", "moral_disputes": "humanities", "moral_scenarios": "humanities",
    "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}


def _subject_filter(subject):
    cache = {}

    def process(dataset: datasets.Dataset) -> datasets.Dataset:
        # The same rows, in order, as dataset.filter(lambda doc: doc["subject"] == subject), but
        # cheaper (lm-eval calls this several times per task): the files are sorted by subject, so
        # the rows are a contiguous range, which select() takes without an index mapping or cache file.
        key = getattr(dataset, "_fingerprint", None)
        if key is None or key not in cache:
            rows = [i for i, s in enumerate(dataset["subject"]) if s == subject]
            if rows and rows == list(range(rows[0], rows[-1] + 1)):
                rows = range(rows[0], rows[-1] + 1)
            selected = dataset.select(rows)
            if key is None:
                return selected
            cache[key] = selected
        return cache[key]

    process.__name__ = f"mmlu_{subject}"
    return process


for _subject in MMLU_SUBJECTS:
    globals()[f"mmlu_{_subject}"] = _subject_filter(_subject)
del _subject
