"""Languages for generation, weighted like E5's synthetic data.

E5 drew languages from the XLM-R list with English at 43.1%, thirteen high-resource languages at about
2.7-3.0% each, and the remaining ~20% shared evenly by the rest. We store names (not codes) because the
prompts ask the LLM to write "in Polish", not "in pl".
"""
from __future__ import annotations

ENGLISH_SHARE = 0.431
HIGH_RESOURCE = ["Polish", "Japanese", "Italian", "Russian", "Indonesian", "German", "Persian", "Spanish",
                 "Chinese", "French", "Portuguese", "Arabic", "Dutch"]
HIGH_RESOURCE_SHARE = 0.0285  # each; the recipe reports 2.7-3.0%
# The rest of the XLM-R languages (names as the LLM would understand them).
OTHER = [
    "Afrikaans", "Albanian", "Amharic", "Armenian", "Assamese", "Azerbaijani", "Basque", "Belarusian",
    "Bengali", "Bosnian", "Breton", "Bulgarian", "Burmese", "Catalan", "Croatian", "Czech", "Danish",
    "Esperanto", "Estonian", "Filipino", "Finnish", "Galician", "Georgian", "Greek", "Gujarati", "Hausa",
    "Hebrew", "Hindi", "Hungarian", "Icelandic", "Irish", "Javanese", "Kannada", "Kazakh", "Khmer", "Korean",
    "Kurdish", "Kyrgyz", "Lao", "Latin", "Latvian", "Lithuanian", "Macedonian", "Malagasy", "Malay",
    "Malayalam", "Marathi", "Mongolian", "Nepali", "Norwegian", "Oriya", "Oromo", "Pashto", "Punjabi",
    "Romanian", "Sanskrit", "Scottish Gaelic", "Serbian", "Sindhi", "Sinhala", "Slovak", "Slovenian", "Somali",
    "Sundanese", "Swahili", "Swedish", "Tamil", "Telugu", "Thai", "Turkish", "Ukrainian", "Urdu", "Uyghur",
    "Uzbek", "Vietnamese", "Welsh", "Western Frisian", "Xhosa", "Yiddish",
]


def e5_language_weights() -> dict[str, float]:
    """Name -> probability, summing to 1."""
    weights = {"English": ENGLISH_SHARE}
    weights.update({name: HIGH_RESOURCE_SHARE for name in HIGH_RESOURCE})
    rest = 1.0 - sum(weights.values())
    weights.update({name: rest / len(OTHER) for name in OTHER})
    return weights
