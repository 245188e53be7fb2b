"""T2I-CompBench rules as pure functions: prompt parsing, the UniDet spatial / numeracy / 3-D rules, 3-in-1.

Every rule restates the official code of Karine-Huang/T2I-CompBench at commit 1b70949 (MIT licence), quirks
included, because the benchmark's numbers are defined by that code (METHOD.md s.5):

- ``BLIPvqa_eval/BLIP_vqa.py``: one question ``"<noun chunk>?"`` per spaCy noun chunk (at most 8, a few
  chunks dropped), each answered with P(yes) / (P(yes) + P(no)), rounded to 4 decimals, multiplied;
- ``UniDet_eval/2D_spatial_eval.py``: first / last NOUN (or the objects around a preposition for the complex
  category), exact label match, ``0.25 * s1 + 0.25 * s2 + position / 2`` and scores below 0.5 set to 0;
- ``UniDet_eval/3D_spatial_eval.py``: substring label match, depth means over *transposed* box slices;
- ``UniDet_eval/numeracy_eval.py``: number word + object from ``new_objects.txt``, duplicates merged by an
  IoU / containment test, 0.5 for presence + 0.5 for the exact count, averaged over objects;
- ``3_in_1_eval/3_in_1.py``: (attribute + spatial) / 2, (attribute + CLIP) / 2 or the mean of all three.

The official parser is spaCy ``en_core_web_sm``; :class:`Token` carries what the rules read from it (text,
trailing whitespace, coarse POS). Without the model, :func:`fallback_tokens` and :func:`fallback_noun_phrases`
approximate it (docs/scorers/compbench.md lists the agreement on the val prompt files).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max) in pixels of the rule frame

# ----------------------------------------------------------------------------------------------- vocabularies

# examples/dataset/new_objects.txt ("singular - plural", duplicates kept: ``index`` takes the first)
_NEW_OBJECTS = (
    "bottle:bottles|cup:cups|cake:cakes|bird:birds|knife:knives|microwave:microwaves|desk:desks|"
    "book:books|helmet:helmets|pillow:pillows|bowl:bowls|flag:flags|stool:stools|toy:toys|pen:pens|"
    "microphone:microphones|bread:breads|fish:fish|camera:cameras|candle:candles|paddle:paddles|"
    "drum:drums|guitar:guitars|tomato:tomatoes|tent:tents|kite:kites|lemon:lemons|"
    "strawberry:strawberries|suitcase:suitcases|pear:pears|printer:printers|duck:ducks|"
    "hamburger:hamburgers|deer:deer|egg:eggs|ship:ships|chicken:chickens|peach:peaches|"
    "helicopter:helicopters|swan:swans|camel:camels|goldfish:goldfish|shrimp:shrimp|banana:bananas|"
    "balloon:balloons|giraffe:giraffes|frog:frogs|horse:horses|man:men|rabbit:rabbits|"
    "bicycle:bicycles|bee:bees|girl:girls|mouse:mice|painting:paintings|fish:fish|chicken:chickens|"
    "desk:desks|lamp:lamps|cow:cows|train:trains|vase:vases|pig:pigs|sheep:sheep|airplane:airplanes|"
    "woman:women|phone:phones|boy:boys|plate:plates|bird:birds|computer:computers|book:books|"
    "couch:couches|turtle:turtles|bowl:bowls|cup:cups|bag:bags|car:cars|backpack:backpacks|"
    "microwave:microwaves|dog:dogs|television:televisions|butterfly:butterflies|cat:cats|"
    "person:people|table:tables|sofa:sofas|key:keys|refrigerator:refrigerators|clock:clocks|"
    "candle:candles|chair:chairs|pig:pigs|rabbit:rabbits|truck:trucks|boat:boats|bear:bears|"
    "bicycle:bicycles|sink:sinks|horse:horses|apple:apples"
)
OBJECTS_SINGULAR: tuple[str, ...] = tuple(p.split(":")[0] for p in _NEW_OBJECTS.split("|"))
OBJECTS_PLURAL: tuple[str, ...] = tuple(p.split(":")[1] for p in _NEW_OBJECTS.split("|"))

# The UniDet "learned_mAP+M" label space (UniDet_eval/dataset/detection_features.pt['labels'], in
# first-occurrence order, duplicates removed): the official rules compare prompt nouns with these strings.
_UNIDET_LABELS = (
    "bottle|cup|dining table|cake|wild bird|knife|remote|microwave|frisbee|toothbrush|"
    "footwear, sneakers|picture, frame|table, desk|street light|book|helmet|pillow|box, storage box|"
    "bowl|watercraft, boat|flag|stool|doll, toy|pen, pen/pencil|microphone|tap, faucet|bread|"
    "sandal, high heels|fish|camera|candle|paddle|drum|guitar|kettle, tea pot|ceiling fan, fan|"
    "whiteboard, blackboard|balloon|corded phone, telephone|orange|football, soccer|"
    "toilet paper, paper towel|tomato|tent|lantern|kite|gas stove|spatula, shovel|rifle, gun|lemon|"
    "squash, pumpkin|musical keyboard, piano|washing machine|cookie, cookies|"
    "cutting board, cutting/chopping board|roller skates, skating and skiing shoes|"
    "cricket ball, baseball|strawberry|coffeemaker, coffee machine|suitcase|grape, grapes|ladder|"
    "pear|rugby ball, american football|printer|duck, goose|tennis ball|chopsticks|hamburger|"
    "cucumber|mixer, blender|deer|egg|barge, ship|turkey, chicken|ice cream|adhesive tape, tape|"
    "wheelchair|cabbage|golf ball|peach|cello|helicopter|penguin|swan|french fries|saxophone|"
    "trombone, trumpet|raccoon, bear|tablet computer, tablet|volleyball|dumbbell|camel|goldfish|"
    "antelope|shrimp|cart, rickshaw|coconut|jellyfish|treadmill|butterfly|pig|shower, hair drier|"
    "asparagus, green onion|dolphin|sushi|burrito, spring rolls|tortoise, tortoise/turtle|parrot|"
    "flute|shark|binoculars|alpaca, llama|pasta, noodles|shellfish, crab|lion|polar bear|"
    "sea lion, seal|table tennis racket, table tennis paddle|starfish|falcon, eagle|monkey|rabbit|"
    "ambulance|segway, hoverboard|truck|boat|bear|handbag|ball|sandwich|bidet|computer monitor|vase|"
    "person|chair|car|houseplant, potted plant|bench|wine glass|umbrella|backpack|loveseat, couch|"
    "tie|infant bed, bed|traffic light|bicycle|sink|horse|apple|teddy bear|motorcycle|laptop|"
    "mobile phone, cell phone|cattle, cow|clock|fork|bus|sheep|computer keyboard, keyboard|dog|spoon|"
    "mouse2, mouse|banana|airplane|briefcase, luggage|ski, skis|baseball glove|refrigerator|train|"
    "doughnut, donut|grapefruit, tangerine|pizza|elephant|broccoli|baseball bat|skateboard|surfboard|"
    "cat|zebra|giraffe|stop sign|carrot|tennis racket|scissors|snowboard|fire hydrant|hot dog|"
    "toaster|hat|lamp|cabinet/shelf|glasses|plate|leather shoes|glove|bracelet|flower|tv|boots|"
    "speaker|trash bin, can|belt|carpet|basket|towel, napkin|slippers|barrel, bucket|coffee table|"
    "suv|sandals|canned|necklace|mirror|ring|van|watch|traffic sign|power outlet|hanger|nightstand|"
    "pot, pan|traffic cone|tripod|hockey|air conditioner|cymbal|pickup truck|trolley|oven|"
    "machinery vehicle|shampoo, shower gel|head phone|cleaning products|sailboat|computer box|"
    "toiletries|toilet|stroller|surveillance camera|life saver|liquid soap|duck|sports car|radiator|"
    "converter|tissue |vent|candy|folder|bow tie|pigeon|pepper|bathtub|basketball|potato|paint brush|"
    "billiards|projector|sausage|fire extinguisher|extension cord|facial mask|"
    "electronic stove and gas stove|pie|kettle|golf club|clutch|tong|slide|facial cleanser|mango|"
    "violin|marker|onion|plum|bar soap|scale|watermelon|router, modem|pine apple|crane|fire truck|"
    "notepaper|tricycle|green beans|brush|carriage|cigar|earphone|hurdle|swing|radio|cd|"
    "parking meter|garlic|horn|avocado|cue|kiwi fruit|fishing rod|cherry|green vegetables|nuts|corn|"
    "key|screwdriver|globe|broom|pliers|hammer|eggplant|trophy|dates|board eraser|rice|"
    "tape measure, ruler|hamimelon|stapler|lettuce|meat balls|medal|toothpaste|trombone|pomegranate|"
    "mushroom|calculator|egg tart|cheese|pomelo|race car|rice cooker|tuba|crosswalk sign|papaya|"
    "chips|urinal|donkey|electric drill|measuring cup|steak|poker card|radish|yak|mop|microscope|"
    "barbell|bread/bun|baozi|red cabbage|lighter|mangosteen|comb|eraser|pitaya|scallop|pencil case|"
    "saw|okra|durian|game board|french horn|asparagus|pasta|target|hotair balloon|chainsaw|lobster|"
    "iron|flashlight|hair drier|rose|sea turtle|animal|crocodile|house|guacamole|"
    "vehicle registration plate|bench1|ladybug|human nose|taco|cannon|tree|bed|hamster|sombrero|"
    "tiara|dragonfly|moths and butterflies|vegetable|torch|building|power plugs and sockets|blender|"
    "billiard table|bronze sculpture|turtle|tiger|zucchini|dress|reptile|golf cart|tart|fedora|"
    "carnivore|lighthouse|food processor|bookcase|marine mammal|frying pan|christmas tree|eagle|"
    "limousine|kitchen & dining room table|tower|willow|human head|dessert|bee|wood-burning stove|"
    "flowerpot|beaker|oyster|woodpecker|harp|wall clock|sports uniform|rhinoceros|beehive|cupboard|"
    "chicken|man|blue jay|fireplace|missile|squirrel|coat|punching bag|billboard|door handle|"
    "mechanical fan|ring binder|sock|weapon|shotgun|seahorse|window|tire|vehicle|canoe|shelf|"
    "human leg|slow cooker|croissant|pancake|coin|stretcher|woman|stairs|harpsichord|human mouth|"
    "juice|skull|door|digital clock|sunflower|leopard|bell pepper|harbor seal|snake|sewing machine|"
    "goose|seat belt|coffee cup|microwave oven|countertop|serving tray|dog bed|beer|sunglasses|"
    "waffle|palm tree|trumpet|ruler|office building|skirt|raven|goat|kitchen knife|"
    "salt and pepper shakers|lynx|boot|platter|swimwear|swimming pool|drinking straw|wrench|ant|"
    "human ear|headphones|fountain|bird|jeans|television|crab|home appliance|snowplow|beetle|"
    "artichoke|jet ski|stationary bicycle|human hair|brown bear|drink|saucer|insect|castle|jaguar|"
    "musical instrument|taxi|pitcher|invertebrate|high heels|bust|scarf|barrel|pumpkin|frog|"
    "human face|swim cap|ostrich|handgun|lizard|snowmobile|light bulb|window blind|muffin|pretzel|"
    "furniture|fox|convenience store|fruit|earrings|curtain|sofa bed|luggage and bags|desk|crutch|"
    "bicycle helmet|tick|canary|lily|kitchen appliance|filing cabinet|aircraft|cake stand|mouse1|"
    "wine|drawer|picnic basket|dice|football helmet|shorts|gondola|honeycomb|chest of drawers|"
    "land vehicle|bat|dagger|tableware|human foot|mug|alarm clock|pressure cooker|human hand|sword|"
    "miniskirt|girl|dinosaur|porch|human beard|submarine sandwich|seafood|racket|wheel|toy|tea|"
    "waste container|mule|pineapple|snowman|lavender|maple|cowboy hat|goggles|caterpillar|poster|"
    "rocket|organ|cocktail|plastic bag|light switch|parachute|winter melon|plumbing fixture|"
    "scoreboard|envelope|bow and arrow|telephone|jacket|boy|otter|office supplies|couch|bull|whale|"
    "shirt|tank|accordion|owl|porcupine|sun hat|nail|crown|piano|sculpture|cheetah|oboe|tin can|"
    "coffee|common fig|salad|marine invertebrates|kangaroo|human arm|snail|suit|teapot|trousers|"
    "popcorn|centipede|spider|sparrow|bagel|personal care|brassiere|bathroom cabinet|studio couch|"
    "cabinetry|towel|jug|wok|human eye|skyscraper|paper towel|lifejacket|bicycle wheel|crosswalk|"
    "bicyclist|motorcyclist|other rider|crosswalk zebra|banner|bike rack|catch basin|cctv camera|"
    "junction box|mailbox|manhole|phone booth|pole|traffic sign frame|utility pole|traffic sign back|"
    "caravan|trailer"
)
UNIDET_LABELS: tuple[str, ...] = tuple(_UNIDET_LABELS.split("|"))

BLIP_SKIPPED_CHUNKS = ("top", "the side", "the left", "the right")  # BLIP_vqa.py drops these noun chunks
BLIP_MAX_QUESTIONS = 8  # BLIP_vqa.py --np_num default
PERSON_WORDS = ("girl", "boy", "man", "woman")  # -> "person" in every UniDet rule
SPATIAL_2D_WORDS = (  # 2D_spatial_eval.py vocab_spatial, first match in this order ("on top of" scores 0)
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
SPATIAL_3D_WORDS = ("in front of", "behind", "hidden")  # 3D_spatial_eval.py vocab_spatial_3d
COMPLEX_PREPOSITIONS = (
    "on top of",
    "on bottom of",
    "on the left",
    "on the right",
    "next to",
    "on side of",
    "near",
)
NUMBER_WORDS = ("a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight")
_WORD_TO_NUM = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
_NUMERACY_ALIASES = {"ship": "boat", "telivision": "tv", "goldfish": "fish", "painting": "picture"}

# ----------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class Token:
    """One token from a spaCy Doc: text, trailing whitespace, coarse POS (None = unknown)."""

    text: str
    whitespace: str = ""
    pos: str | None = None


def span_text(tokens: Sequence[Token]) -> str:
    """spaCy's ``Span.text``: the tokens with their whitespace, without the last token's trailing space."""
    if not tokens:
        return ""
    return "".join(t.text + t.whitespace for t in tokens[:-1]) + tokens[-1].text


_TOKEN_RE = re.compile(r"\d+(?::\d+)+|\w+(?=n't)|n't|'\w+|\w+(?:-\w+)*|[^\w\s]")

# Word lists of the fallback tagger (the parts of speech spaCy gives these words in the val prompts)
_DETERMINERS = set(
    "a an the this that these those its their his her my our your some each every another".split()
)
_ADPOSITIONS = set(
    "on in of at by with near under above below behind beside between into onto over from to for through "
    "across against along among around inside outside upon within without toward towards past like".split()
)
_AUXILIARIES = set(
    "is are was were be been being am has have had do does did can could will would should may".split()
)
_OTHER = set(  # conjunctions, pronouns, adverbs: never part of a noun phrase
    "and or but as while than then it they he she we you i there here which who whom whose them "
    "next together very down up away off out just also carefully slowly gently quietly".split()
)
_COLOURS = set(
    "black white red green blue yellow brown gray grey pink purple orange gold silver beige tan".split()
)
_ADJECTIVES = _COLOURS | set(
    # shapes and sizes
    "golden round circular square rectangular triangular oval oblong spherical cubic conical cylindrical "
    "pyramidal pentagonal teardrop big small large tiny tall short long narrow wide thick thin huge giant "
    "little "
    # textures and materials used as adjectives
    "fluffy wooden metallic soft hard rough smooth shiny glossy furry fuzzy silky sleek sticky crisp crunchy "
    "jagged prickly bumpy polished rusty "
    # frequent adjectives of the complex and non-spatial prompts
    "old new modern ancient vintage bright dark dim colorful vibrant warm cool cold hot fresh sweet sour "
    "juicy delicious beautiful elegant cozy calm quiet busy empty full heavy light wet dry clean sharp dull "
    "deep gentle delicate fragrant lush majestic serene sturdy thorny twisted ripe rich graceful intricate "
    "ornate plush playful peaceful wild tasty savory sparkling shimmering".split()
)
_IRREGULAR_VERBS = set(
    "sat lay hung fell shone sped wrote stood ran flew grew sang swam drove held kept led lit spun struck "
    "stuck took told woke blew drew ate went came gave found sits lies hangs shines reads holds".split()
)
_NOUNS_LIKE_VERBS = (  # -ing / -ed nouns
    set(
        "painting building ceiling string wedding thing morning evening clothing stocking pudding icing "
        "frosting railing earring dumpling duckling sibling bed shed sled seed".split()
    )
    | set(OBJECTS_SINGULAR)
    | set(OBJECTS_PLURAL)
)


def fallback_tokens(text: str) -> list[Token]:
    """Tokens without spaCy: words (hyphenated kept), clitics ("'s", "n't"), times ("11:44"), punctuation.

    Equal to spaCy's English tokenizer on every numeracy, spatial and 3-D val prompt. The coarse POS comes
    from word lists (DET, ADP, AUX, ADJ, irregular verbs), ``-ing`` / ``-ed`` endings (VERB) and NOUN
    otherwise: enough for the rules, not a tagger (docs/scorers/compbench.md gives the agreement).
    """
    matches = list(_TOKEN_RE.finditer(text))
    pos = [_fallback_pos(m.group()) for m in matches]
    for i, m in enumerate(matches):
        # an -ing / -ed word right after a determiner or adjective is a modifier or a noun ("a short sapling")
        if (
            pos[i] == "VERB"
            and m.group().lower() not in _IRREGULAR_VERBS
            and i
            and pos[i - 1] in ("DET", "ADJ")
        ):
            pos[i] = "ADJ" if i + 1 < len(pos) and pos[i + 1] in ("NOUN", "ADJ") else "NOUN"
    return [
        Token(m.group(), " " if m.end() < len(text) and text[m.end()].isspace() else "", p)
        for m, p in zip(matches, pos)
    ]


def _fallback_pos(word: str) -> str:
    w = word.lower()
    if not any(c.isalnum() for c in w):
        return "PUNCT"
    if w[0].isdigit():
        return "NUM"
    for pos, words in (("DET", _DETERMINERS), ("ADP", _ADPOSITIONS), ("AUX", _AUXILIARIES), ("X", _OTHER)):
        if w in words:
            return pos
    if w.startswith("'") or w == "n't":
        return "PART"
    if w in _ADJECTIVES:
        return "ADJ"
    if w in _IRREGULAR_VERBS or (w not in _NOUNS_LIKE_VERBS and len(w) > 4 and w.endswith(("ing", "ed"))):
        return "VERB"
    return "NOUN"


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's ``pre_question``: lower-case, drop ``.!"()*#:;~``, strip trailing spaces, keep 50 words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def fallback_noun_phrases(prompt: str) -> list[str]:
    """Noun phrases without a parser: maximal DET / ADJ / NOUN runs of the fallback tokens, cut at the head.

    A new determiner starts a new phrase; "and" or "," joins two adjectives ("a black and white cat") and
    otherwise splits; an ``-ing`` / ``-ed`` word between a phrase and a noun is a modifier ("a circular dining
    table"); the head is the last NOUN, or a final adjective after another word ("a red orange", "a traffic
    light"). On "<phrase> and <phrase>" prompts this gives spaCy's ``noun_chunks`` unless spaCy mis-parses.
    """
    tokens = fallback_tokens(prompt)
    phrases: list[list[Token]] = []
    current: list[Token] = []
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1].pos if i else None
        nxt = tokens[i + 1].pos if i + 1 < len(tokens) else None
        joins_adjectives = tok.text in ("and", ",") and prev == "ADJ" and nxt == "ADJ"
        modifier = tok.pos == "VERB" and tok.text.lower() not in _IRREGULAR_VERBS and nxt in ("NOUN", "ADJ")
        if tok.pos in ("ADJ", "NOUN", "NUM") or ((joins_adjectives or modifier) and current):
            current.append(tok)
        elif tok.pos == "DET":
            phrases.append(current)
            current = [tok]
        else:
            phrases.append(current)
            current = []
    phrases.append(current)
    out = []
    for phrase in phrases:
        content = [i for i, t in enumerate(phrase) if t.pos in ("NOUN", "ADJ", "NUM")]
        heads = [i for i in content if phrase[i].pos == "NOUN"]
        if heads:
            end = heads[-1]
            if content[-1] > end and phrase[content[-1]].pos == "ADJ":  # "a traffic light": light is the head
                end = content[-1]
        elif len(content) >= 2 and phrase[content[-1]].pos == "ADJ":  # "a red orange"
            end = content[-1]
        else:
            continue
        out.append(span_text(phrase[: end + 1]))
    return [p for p in out if p not in BLIP_SKIPPED_CHUNKS]


def fallback_spatial_objects(prompt: str, vocabulary: Sequence[str]) -> tuple[str | None, str | None]:
    """(object 1, object 2) of a "<a X> <relation> <a Y>" prompt without a tagger.

    The last word before the relation and the last word of the prompt: spaCy's first / last NOUN on every
    spatial and 3-D val prompt.
    """
    locality = first_locality(prompt, vocabulary)
    if locality is None:
        return (None, None)
    left, _, right = prompt.partition(locality)
    words1, words2 = re.findall(r"[A-Za-z]+", left), re.findall(r"[A-Za-z]+", right)
    return (words1[-1] if words1 else None, words2[-1] if words2 else None)


def blip_questions(noun_phrases: Sequence[str], max_questions: int = BLIP_MAX_QUESTIONS) -> list[str]:
    """The BLIP-VQA questions of a prompt: ``pre_question(phrase + "?")`` for its first ``max_questions``.

    ``noun_phrases`` are spaCy noun chunks (or :func:`fallback_noun_phrases`); the skipped chunks are removed
    here as in ``BLIP_vqa.py``.
    """
    kept = [p for p in noun_phrases if p not in BLIP_SKIPPED_CHUNKS]
    return [pre_question(f"{p}?") for p in kept[:max_questions]]


def blip_score(yes_probabilities: Sequence[float]) -> float:
    """Product of the per-question P(yes), each rounded to 4 decimals as the official JSON has it; 1 if none.

    The product is rounded to 4 decimals too (``'{:.4f}'`` in ``BLIP_vqa.py``).
    """
    product = 1.0
    for p in yes_probabilities:
        product *= float(f"{p:.4f}")
    return float(f"{product:.4f}")


def simple_spatial_objects(tokens: Sequence[Token]) -> tuple[str | None, str | None]:
    """(first NOUN, last NOUN) of a spatial / 3-D prompt, as the official scripts pick them, or Nones."""
    nouns = [t.text for t in tokens if t.pos == "NOUN"]
    return (nouns[0], nouns[-1]) if nouns else (None, None)


def complex_spatial_objects(tokens: Sequence[Token]) -> tuple[str | None, str | None]:
    """The two objects of a complex prompt's spatial relation (``2D_spatial_eval.py --complex``).

    For each preposition of :data:`COMPLEX_PREPOSITIONS` (matched on 3-, 2- or 1-token spans), the nearest
    NOUN or PROPN before it and the first NOUN after it (or, failing that, a PROPN not followed by a PROPN).
    The pair counts only when exactly two objects were found.
    """
    objects: list[str] = []
    n = len(tokens)
    for i in range(n):
        spans = [span_text(tokens[i : i + k]) for k in (3, 2, 1)]
        if not any(s in COMPLEX_PREPOSITIONS for s in spans):
            continue
        k = next(k for k, s in zip((3, 2, 1), spans) if s in COMPLEX_PREPOSITIONS)
        for j in range(i - 1, -1, -1):
            if tokens[j].pos in ("NOUN", "PROPN"):
                objects.append(tokens[j].text)
                break
        reached_end = False
        for j in range(i + k, n):
            if tokens[j].pos == "NOUN":
                objects.append(tokens[j].text)
                break
            if j == n - 1:
                reached_end = True
        if reached_end:
            for j in range(i + k, n):
                if j + 1 < n and tokens[j].pos == "PROPN" and tokens[j + 1].pos != "PROPN":
                    objects.append(tokens[j].text)
                    break
    return (objects[0], objects[1]) if len(objects) == 2 else (None, None)


def without_adjectives(tokens: Sequence[Token]) -> str:
    """The complex category's CLIP text: the tokens that are not ADJ, joined by single spaces."""
    return " ".join(t.text for t in tokens if t.pos != "ADJ")


def first_locality(prompt: str, vocabulary: Sequence[str]) -> str | None:
    """The first relation word of ``vocabulary`` found in the prompt (plain substring test)."""
    return next((w for w in vocabulary if w in prompt), None)


def to_detector_name(word: str | None) -> str | None:
    """girl / boy / man / woman -> person (the spatial and 3-D rules)."""
    return "person" if word in PERSON_WORDS else word


# ----------------------------------------------------------------------------------------------- geometry


def rule_frame_size(height: int, width: int, size: int = 479, max_size: int = 480) -> tuple[int, int]:
    """(h, w) of ``Resize(size=479, max_size=480)``: the frame of the UniDet boxes and depth maps.

    torchvision's rule: shorter side -> size, longer -> int(size * long / short), then both scaled down (with
    truncation) if the longer side exceeds ``max_size``.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def spatial_iou(box1: Box, box2: Box) -> float:
    """IoU as ``determine_position`` computes it (continuous coordinates; 0 for an empty union)."""
    x_overlap = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    y_overlap = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    intersection = x_overlap * y_overlap
    union = (
        (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - intersection
    )
    return intersection / union if union > 0 else 0.0


def _mean_depth(depth: np.ndarray, box: Box) -> float:
    # official quirk: rows are indexed by x and columns by y (depth_map[x_min:x_max, y_min:y_max])
    part = depth[int(box[0]) : int(box[2]), int(box[1]) : int(box[3])]
    return float(part.mean()) if part.size else math.nan


def determine_position(
    locality: str | None,
    box1: Box,
    box2: Box,
    depth: np.ndarray | None = None,
    iou_threshold: float = 0.1,
    distance_threshold: float = 150.0,
    iou_threshold_3d: float = 0.5,
) -> float:
    """The official soft position score of object 1 relative to object 2, in [0, 1].

    2-D (pixels of the 479-px rule frame): "next to" / "near" / "on side of" is 1 when the centres are closer
    than 150 px on either axis, else 150 / max distance; left / right / top / bottom need the centre offset
    on the right side and dominant on that axis, then 1 if IoU < 0.1 else 0.1 / IoU. 3-D (``depth`` =
    inverse depth in [0, 1], larger = nearer): "in front of" needs mean depth 1 > mean depth 2, "behind" /
    "hidden" the opposite; 1 when IoU > 0.5, IoU / 0.5 when 0 < IoU < 0.5, else 0. Any other locality (even
    "on top of") is 0.
    """
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    iou = spatial_iou(box1, box2)
    if locality in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    axis_ok = {
        "on the right of": dx < 0 and abs(dx) > abs(dy),
        "on the left of": dx > 0 and abs(dx) > abs(dy),
        "on the bottom of": dy < 0 and abs(dy) > abs(dx),
        "on the top of": dy > 0 and abs(dy) > abs(dx),
    }
    if locality in axis_ok:
        if not axis_ok[locality]:
            return 0.0
        return 1.0 if iou < iou_threshold else iou_threshold / iou
    if locality in ("in front of", "behind", "hidden"):
        if depth is None:
            raise ValueError(f"determine_position: locality {locality!r} needs a depth map")
        diff = _mean_depth(depth, box1) - _mean_depth(depth, box2)
        ordered = diff > 0 if locality == "in front of" else diff < 0  # NaN (empty slice) compares False
        if iou > iou_threshold_3d:
            return 1.0 if ordered else 0.0
        if 0 < iou < iou_threshold_3d:
            return iou / iou_threshold_3d if ordered else 0.0
        return 0.0
    return 0.0


@dataclass(frozen=True)
class Detection:
    """One detection in the rule frame: a label string (UniDet's name or the queried word), score, box."""

    label: str
    score: float
    box: Box


def spatial_score_2d(
    obj1: str | None, obj2: str | None, locality: str | None, detections: Sequence[Detection]
) -> float:
    """``2D_spatial_eval.py``: exact label match on the score-sorted detections, then the 0.5 cut-off."""
    obj1, obj2 = to_detector_name(obj1), to_detector_name(obj2)
    labels = [d.label for d in detections]
    if obj1 in labels and obj2 in labels:
        d1, d2 = detections[labels.index(obj1)], detections[labels.index(obj2)]
        score = 0.25 * d1.score + 0.25 * d2.score + determine_position(locality, d1.box, d2.box) / 2
    elif obj1 in labels:
        score = 0.25 * detections[labels.index(obj1)].score
    elif obj2 in labels:
        score = 0.25 * detections[labels.index(obj2)].score
    else:
        score = 0.0
    return 0.0 if score < 0.5 else score


def spatial_score_3d(
    obj1: str | None,
    obj2: str | None,
    locality: str | None,
    detections: Sequence[Detection],
    depth: np.ndarray,
) -> float:
    """``3D_spatial_eval.py``: substring label match (its position loop included), depth rule, no cut-off."""
    obj1, obj2 = to_detector_name(obj1), to_detector_name(obj2)
    labels = [d.label for d in detections]
    if obj1 is None or obj2 is None:
        return 0.0
    pos1 = pos2 = None
    for i, label in enumerate(labels):
        # official loop: both indices are overwritten until both are set, so pos1 may not be the first match
        if obj1 in label:
            pos1 = i
        if obj2 in label:
            pos2 = i
        if pos1 is not None and pos2 is not None:
            break
    if pos1 is not None and pos2 is not None:
        d1, d2 = detections[pos1], detections[pos2]
        return (
            0.25 * d1.score + 0.25 * d2.score + determine_position(locality, d1.box, d2.box, depth=depth) / 2
        )
    first1 = next((i for i, label in enumerate(labels) if obj1 in label), None)
    if first1 is not None:
        return 0.25 * detections[first1].score
    first2 = next((i for i, label in enumerate(labels) if obj2 in label), None)
    return 0.25 * detections[first2].score if first2 is not None else 0.0


def numeracy_targets(tokens: Sequence[Token]) -> tuple[list[str], list[int]]:
    """``numeracy_eval.py``'s parse: (objects, counts) from number words followed by a known object.

    Two-word objects are tried first; plural objects map to their singular. As in the official code a count
    that ``word_to_num`` cannot read ("a"/"an" before a plural) is skipped, so the lists can differ in length.
    """
    words = [t.text for t in tokens]
    objects: list[str] = []
    counts: list[int] = []
    n = len(words)
    for i, word in enumerate(words):
        if word not in NUMBER_WORDS or i + 1 >= n:
            continue
        two = f"{words[i + 1]} {words[i + 2]}" if i < n - 2 else None
        if two is not None and (two in OBJECTS_SINGULAR or two in OBJECTS_PLURAL):
            if two in OBJECTS_PLURAL and word not in ("a", "an", "one"):
                objects.append(OBJECTS_SINGULAR[OBJECTS_PLURAL.index(two)])
                if word in _WORD_TO_NUM:
                    counts.append(_WORD_TO_NUM[word])
            else:
                counts.append(1)
                objects.append(two)
        elif words[i + 1] in OBJECTS_SINGULAR or words[i + 1] in OBJECTS_PLURAL:
            nxt = words[i + 1]
            if nxt in OBJECTS_SINGULAR and word in ("a", "an", "one"):
                counts.append(1)
                objects.append(nxt)
            elif nxt in OBJECTS_PLURAL:
                objects.append(OBJECTS_SINGULAR[OBJECTS_PLURAL.index(nxt)])
                if word in _WORD_TO_NUM:
                    counts.append(_WORD_TO_NUM[word])
            # official: a singular after a number > 1 ("two dog") raises in object_p.index; skipped here
    return objects, counts


def numeracy_detector_name(word: str) -> str:
    """numeracy_eval.py's renames before label matching: girl -> person, ship -> boat, painting -> picture."""
    return "person" if word in PERSON_WORDS else _NUMERACY_ALIASES.get(word, word)


def same_instance(box1: Box, box2: Box) -> bool:
    """``numeracy_eval.calculate_iou``: IoU > 0.9 or either box > 90 % covered (integer-pixel areas, +1)."""
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2, iy2 = min(box1[2], box2[2]), min(box1[3], box2[3])
    inter = max(0.0, ix2 - ix1 + 1) * max(0.0, iy2 - iy1 + 1)
    area1 = (box1[2] - box1[0] + 1) * (box1[3] - box1[1] + 1)
    area2 = (box2[2] - box2[0] + 1) * (box2[3] - box2[1] + 1)
    iou = inter / float(area1 + area2 - inter)
    return iou > 0.9 or inter / float(area1) > 0.9 or inter / float(area2) > 0.9


def numeracy_score(objects: Sequence[str], counts: Sequence[int], detections: Sequence[Detection]) -> float:
    """``numeracy_eval.py``: per object 0.5 if detected + 0.5 if the de-duplicated count is exact, averaged.

    Detections of the same label that :func:`same_instance` pairs are merged first; an object missing from the
    labels takes over every label that contains it as a substring ("mouse" renames "mouse2, mouse").
    Returns NaN when the prompt names no countable object (the official script divides by zero there).
    """
    if not objects:
        return math.nan
    kept: list[Detection] = []
    for det in detections:
        if not any(det.label == k.label and same_instance(det.box, k.box) for k in kept):
            kept.append(det)
    labels = [d.label for d in kept]
    weight = 1.0 / len(objects)
    score = 0.0
    for i, obj in enumerate(objects):
        obj = numeracy_detector_name(obj)
        if obj not in labels:
            labels = [obj if obj in label else label for label in labels]
        if obj in labels:
            score += 0.5 * weight
            if i < len(counts) and labels.count(obj) == counts[i]:
                score += 0.5 * weight
    return score


# ------------------------------------------------------------------------------------------ detector plumbing


def unidet_labels_for(word: str | None, label_space: Sequence[str] = UNIDET_LABELS) -> list[str]:
    """The labels a rule could match for ``word``: every label containing it (exact matches included)."""
    if not word:
        return []
    return [label for label in label_space if word in label]


def label_query_texts(label: str) -> list[str]:
    """Open-vocabulary query words for a UniDet label: its comma-separated synonyms, qualifiers removed.

    "table, desk" -> ["table", "desk"]; "mouse2, mouse" -> ["mouse", "mouse"]; "duck (bird)" -> ["duck"].
    """
    names = [re.sub(r"\s*\(.*?\)|\d+$", "", part).strip() for part in label.split(", ")]
    return [n for n in names if n] or [label]


def nms_per_label(
    detections: Sequence[Detection], iou_threshold: float = 0.5, max_detections: int = 100
) -> list[Detection]:
    """Greedy per-label NMS (detectron2's test-time default 0.5), score-sorted, at most ``max_detections``."""
    ordered = sorted(detections, key=lambda d: -d.score)
    kept: list[Detection] = []
    for det in ordered:
        if all(k.label != det.label or _plain_iou(k.box, det.box) <= iou_threshold for k in kept):
            kept.append(det)
    return kept[:max_detections]


def _plain_iou(a: Box, b: Box) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------- 3-in-1


def complex_kind(prompt: str, spatial_prompts: Sequence[str], action_prompts: Sequence[str]) -> str:
    """ "spatial", "action" or "spatial_action", as ``3_in_1.py`` decides on ``s.split('.')[0].lower()``."""

    def key(s: str) -> str:
        return s.strip("\n").split(".")[0].lower()

    k = key(prompt)
    if k in {key(p) for p in spatial_prompts}:
        return "spatial"
    if k in {key(p) for p in action_prompts}:
        return "action"
    return "spatial_action"


def three_in_one(kind: str, attribute: float, spatial: float | None, clip: float | None) -> float:
    """``3_in_1.py``: (attribute + spatial) / 2, (attribute + CLIP) / 2, or the mean of the three."""
    if kind == "spatial":
        return (spatial + attribute) * 0.5
    if kind == "action":
        return (clip + attribute) * 0.5
    if kind == "spatial_action":
        return (attribute + spatial + clip) / 3
    raise ValueError(f"complex kind must be 'spatial', 'action' or 'spatial_action', got {kind!r}")


# ----------------------------------------------------------------------------------------------- parser


class PromptParser:
    """What the rules need from spaCy ``en_core_web_sm``, with the documented fallback when it is missing.

    ``nlp``: "auto" (spaCy if ``spacy_model`` loads, else the fallback), "spacy" (required), "fallback",
    or a spaCy ``Language`` (any callable returning a Doc). ``name`` records which one is in use.
    """

    def __init__(self, nlp: object = "auto", spacy_model: str = "en_core_web_sm") -> None:
        self._nlp = None
        if nlp in ("auto", "spacy"):
            try:
                import spacy

                self._nlp = spacy.load(spacy_model)
            except (ImportError, OSError) as e:
                if nlp == "spacy":
                    raise OSError(
                        f"T2I-CompBench parses prompts with spaCy {spacy_model!r}, which could not be loaded "
                        f"({type(e).__name__}: {e}). Install it (`pip install flowopd[compbench]` and "
                        f"`python -m spacy download {spacy_model}`), or pass nlp='fallback' to use the "
                        f"documented approximation"
                    ) from e
        elif callable(nlp):
            self._nlp = nlp
        elif nlp != "fallback":
            raise ValueError(f"nlp must be 'auto', 'spacy', 'fallback' or a spaCy Language, got {nlp!r}")
        meta = getattr(self._nlp, "meta", None) or {}
        model = (
            f"{meta.get('lang', '')}_{meta['name']}-{meta.get('version', '')}"
            if "name" in meta
            else spacy_model
        )
        self.name = "fallback" if self._nlp is None else f"spacy:{model}"
        self._docs: dict[str, object] = {}

    @property
    def uses_spacy(self) -> bool:
        return self._nlp is not None

    def _doc(self, prompt: str) -> object:
        if prompt not in self._docs:  # ten images share a prompt: parse it once
            if len(self._docs) >= 4096:  # bounded: a training run sees many prompts
                self._docs.clear()
            self._docs[prompt] = self._nlp(prompt)
        return self._docs[prompt]

    def tokens(self, prompt: str) -> list[Token]:
        """The prompt's tokens with spaCy's text, whitespace and coarse POS (or the fallback's)."""
        if self._nlp is None:
            return fallback_tokens(prompt)
        return [Token(t.text, t.whitespace_, t.pos_) for t in self._doc(prompt)]

    def noun_phrases(self, prompt: str) -> list[str]:
        """spaCy ``noun_chunks`` texts (or :func:`fallback_noun_phrases`)."""
        if self._nlp is None:
            return fallback_noun_phrases(prompt)
        return [chunk.text for chunk in self._doc(prompt).noun_chunks]

    def spatial_objects(self, prompt: str, vocabulary: Sequence[str]) -> tuple[str | None, str | None]:
        """(first NOUN, last NOUN) with spaCy, else :func:`fallback_spatial_objects`."""
        if self._nlp is None:
            return fallback_spatial_objects(prompt, vocabulary)
        return simple_spatial_objects(self.tokens(prompt))
