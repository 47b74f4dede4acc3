"""Small French (and deliberately bad) documents the data tests build their corpora from."""

from __future__ import annotations

import random

SENTENCES = [
    "Le système de paquets de Debian permet d'installer un logiciel avec toutes ses dépendances en une seule commande.",
    "Chaque matin, la boulangère du village ouvre sa boutique avant le lever du soleil et prépare des croissants.",
    "La Révolution française a profondément transformé les institutions politiques et la société de l'époque.",
    "Les élèves de la classe de seconde étudient la géographie de l'Europe et les grands fleuves du continent.",
    "Pour configurer le réseau, il faut modifier le fichier de configuration puis redémarrer le service concerné.",
    "Le musée du Louvre accueille chaque année des millions de visiteurs venus du monde entier.",
    "Une bonne sauvegarde doit être vérifiée régulièrement, sinon elle ne sert pas à grand-chose le jour de la panne.",
    "Les vendanges commencent souvent à la fin du mois de septembre dans les vignobles de Bourgogne.",
    "Le conseil municipal s'est réuni hier soir pour discuter du budget de la nouvelle médiathèque.",
    "Victor Hugo a écrit Les Misérables pendant son exil à Guernesey, loin de la France impériale.",
    "Le noyau Linux gère la mémoire, les processus et les pilotes de périphériques de la machine.",
    "Il pleuvait depuis trois jours et la rivière commençait à déborder sur les prés voisins.",
    "Le train pour Marseille partira avec vingt minutes de retard en raison d'un incident technique.",
    "Les abeilles jouent un rôle essentiel dans la pollinisation des arbres fruitiers et des cultures.",
    "Un administrateur prudent lit toujours les notes de version avant de mettre à jour un serveur en production.",
    "La cuisine lyonnaise est réputée pour ses quenelles, ses saucissons et ses fameux bouchons.",
    "Le tribunal a rendu sa décision après plusieurs semaines de délibération et d'audition des témoins.",
    "Les montagnes des Alpes offrent en hiver de nombreuses pistes aux amateurs de ski et de randonnée.",
    "Ce chapitre présente les principales commandes qui servent à inspecter l'état du système.",
    "La bibliothèque municipale prête gratuitement des livres, des disques et des revues à ses adhérents.",
    "Le pare-feu filtre les connexions entrantes selon des règles que l'administrateur définit avec soin.",
    "Marie a passé l'été chez ses grands-parents, dans une vieille ferme au bord de la Loire.",
    "Les chercheurs ont publié une étude sur l'évolution du climat dans les régions méditerranéennes.",
    "Un utilisateur ordinaire ne peut pas modifier les fichiers qui appartiennent à l'administrateur.",
    "La fête de la musique rassemble chaque année des musiciens amateurs dans toutes les rues de la ville.",
    "Le journal local consacre sa une à l'ouverture du nouveau pont sur la Garonne.",
    "On peut consulter les journaux du système pour comprendre pourquoi un service refuse de démarrer.",
    "Les paysans de la région cultivent du blé, du maïs et des betteraves sur de grandes parcelles.",
    "La comédie de Molière fut jouée pour la première fois devant le roi et sa cour à Versailles.",
    "Un disque dur plein peut bloquer l'écriture des journaux et provoquer des erreurs inattendues.",
    "Le professeur a expliqué la démonstration au tableau avant de distribuer les exercices du jour.",
    "La marée basse découvre de larges étendues de sable où les enfants cherchent des coquillages.",
    "Les développeurs bénévoles maintiennent des milliers de paquets pour la distribution.",
    "Le marché du samedi propose des fromages, des légumes de saison et du miel des environs.",
    "Il est conseillé de choisir un mot de passe long, difficile à deviner et différent pour chaque service.",
    "L'orchestre a interprété une symphonie de Berlioz sous la direction d'une jeune cheffe talentueuse.",
    "La gare a été rénovée et dispose désormais d'un parking pour les vélos et d'une salle d'attente chauffée.",
    "Les serveurs de messagerie doivent être protégés contre les envois massifs de courriels indésirables.",
    "Le vieux phare breton guide encore les bateaux de pêche qui rentrent au port à la nuit tombée.",
    "Les archives départementales conservent des registres paroissiaux datant du seizième siècle.",
    "Une tempête a arraché plusieurs arbres et privé d'électricité des centaines de foyers.",
    "Le script vérifie chaque nuit l'espace disque disponible et envoie un rapport par courriel.",
    "Les historiens débattent encore des causes exactes de la chute de l'Empire romain d'Occident.",
    "Le médecin recommande de boire beaucoup d'eau et de se reposer pendant quelques jours.",
    "La nouvelle version apporte de nombreuses corrections de sécurité et une meilleure prise en charge du matériel.",
    "Au printemps, les cerisiers en fleurs attirent les promeneurs dans les jardins publics de la ville.",
    "Les comptes rendus des réunions sont publiés sur le site de la mairie quelques jours plus tard.",
    "Le cycliste a franchi la ligne d'arrivée sous les applaudissements d'une foule enthousiaste.",
]

ENGLISH = ("The package manager installs software together with all of its dependencies. It is the most "
           "important tool of the system administrator, and it should be used with care on production servers "
           "because an upgrade can change the behaviour of many services at the same time. ") * 3

GERMAN = ("Das Paketverwaltungssystem installiert die Software zusammen mit allen ihren Abhängigkeiten. "
          "Es ist das wichtigste Werkzeug des Systemverwalters und sollte auf den Servern mit Vorsicht "
          "verwendet werden, weil eine Aktualisierung das Verhalten vieler Dienste verändern kann. ") * 3



def ocr_corrupt(text: str, seed: int = 0, rate: float = 0.25) -> str:
    """What bad OCR of an old print looks like: letters read as digits or symbols, stray marks."""
    rng = random.Random(seed)
    swaps = {"e": "c", "n": "u", "l": "1", "a": "4", "o": "0", "i": "|", "s": "5", "r": "ř"}
    out = []
    for word in text.split(" "):
        if rng.random() < rate:
            word = "".join(swaps.get(c, c) for c in word)
        if rng.random() < 0.08:
            word += rng.choice([" ~", " |l|", " ,,;", " ^^", " ]["])
        out.append(word)
    return " ".join(out)


OCR_GARBAGE = ocr_corrupt(" ".join(SENTENCES[:12]), seed=3)


def french_doc(seed: int, n_sentences: int = 9) -> str:
    """A distinct French document: random sentences of the pool, in paragraphs."""
    rng = random.Random(seed)
    picked = rng.sample(SENTENCES, n_sentences)
    paras = [" ".join(picked[i:i + 3]) for i in range(0, n_sentences, 3)]
    return "\n\n".join(paras)


def near_duplicate(text: str) -> str:
    """The same document with a few words changed (Jaccard of 5-gram shingles ~0.85+)."""
    return text.replace("la ", "cette ", 1).replace(" et ", " puis ", 1) + " Fin du document."
