"""Small real artifacts the tests share: a French tokenizer (atomic ChatML or text markers)
and tiny model directories. Built once per test session under pytest's tmp dir."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from rodin.chat import jinja_template
from rodin.checkpoint import save_model
from rodin.config import ModelConfig
from rodin.model import Transformer
from rodin.tokenizer import Tokenizer, train_tokenizer

FRENCH_TEXTS = [
    "Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur Paris.",
    "Où est la bibliothèque ? Elle se trouve à côté de l'église, près de la rivière.",
    "En 1789, la Révolution française a profondément changé la société et ses institutions.",
    "Les élèves étudient les mathématiques, le français, l'histoire et la géographie au collège.",
    "Ça coûte 12,50 € : c'est cher pour un café crème, même à Lyon !",
    "Il était une fois une princesse qui vivait dans un château au bord de la mer.",
    "Debian est un système d'exploitation libre, développé par des milliers de bénévoles.",
    "Pour installer un paquet, utilisez la commande apt-get install suivie du nom du paquet.",
    "L'été dernier, nous sommes allés à la montagne ; l'air y était frais et pur.",
    "Quelle heure est-il ? Il est 14 h 30, le train part dans vingt minutes.",
    "Œuvres complètes de Molière : « Le Misanthrope », « Tartuffe » et « L'Avare ».",
    "Les données sont enregistrées dans le fichier /etc/hosts, ligne par ligne.\nDeuxième ligne.",
]
TRICKY_TEXTS = [
    "Déjà vu à Noël : « ça » coûte 3,14 € ! 🎉🇫🇷",
    "deux  espaces,   trois espaces\tune tabulation\net une nouvelle ligne",
    "  espace initial et chiffres 2024-11-26 12345678",
    "Emoji rare 🦜 et caractère chinois 漢 hors vocabulaire",
]


def corpus(repeat: int = 20) -> list[str]:
    return FRENCH_TEXTS * repeat


def make_tokenizer(out_dir: Path, atomic_chatml: bool = True, vocab_size: int = 512,
                   add_dummy_prefix: bool = False) -> Tokenizer:
    path = train_tokenizer(corpus(), out_dir, vocab_size=vocab_size, atomic_chatml=atomic_chatml,
                           add_dummy_prefix=add_dummy_prefix)
    return Tokenizer(path)


def debug_config(tokenizer: Tokenizer, **overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_name("rodin-debug"), vocab_size=tokenizer.vocab_size, **overrides)


def make_model_dir(out_dir: Path, tokenizer: Tokenizer, chat: bool = False, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = Transformer(debug_config(tokenizer, **overrides))
    return save_model(model, out_dir, tokenizer=tokenizer, chat_template=jinja_template() if chat else None)
