"""What the detector sees and how the rules name it: the object vocabulary of the numeracy prompts, the
UniDet label space, :class:`Detection` and the detector plumbing (label queries, per-label NMS, the rule
frame).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max) in pixels of the rule frame

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

PERSON_WORDS = ("girl", "boy", "man", "woman")  # -> "person" in every UniDet rule


def to_detector_name(word: str | None) -> str | None:
    """girl / boy / man / woman -> person (the spatial and 3-D rules)."""
    return "person" if word in PERSON_WORDS else word


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


@dataclass(frozen=True)
class Detection:
    """One detection in the rule frame: a label string (UniDet's name or the queried word), score, box."""

    label: str
    score: float
    box: Box


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
