"""Specs of known domain-generalisation datasets: domain names, class names, sizes.

A spec validates a folder before any work starts, so that a typo or a partial download is
reported in one line instead of a wrong result. Every dataset is a folder
``<domain>/<class>/<image>``; class folder names with underscores read as spaces in prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    sizes: dict[str, int] = field(default_factory=dict)  # images per domain, full release
    hub_id: str | None = None  # Hugging Face dataset with a "domain" column, if any
    hub_revision: str | None = None  # the hub commit `fedclip fetch` downloads (pinned)
    num_classes: int | None = None  # checked when ``classes`` is not listed


PACS = DatasetSpec(
    name="pacs",
    domains=("art_painting", "cartoon", "photo", "sketch"),
    classes=("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
    sizes={"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929},
    hub_id="flwrlabs/pacs",
    # the commit whose README declares the 9,991-image train split (download 191 MB)
    hub_revision="9c6f80edcd5320a55a39b1e84120dcfa25c8ce9b",
)

VLCS = DatasetSpec(
    name="vlcs",
    domains=("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    classes=("bird", "car", "chair", "dog", "person"),
    sizes={"Caltech101": 1415, "LabelMe": 2656, "SUN09": 3282, "VOC2007": 3376},
)

OFFICE_HOME = DatasetSpec(
    name="office-home",
    domains=("Art", "Clipart", "Product", "Real World"),
    classes=tuple(sorted((
        "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
        "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
        "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder",
        "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade",
        "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
        "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio",
        "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
        "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can",
        "Webcam",
    ))),
    sizes={"Art": 2427, "Clipart": 4365, "Product": 4439, "Real World": 4357},
    hub_id="flwrlabs/office-home",
)

# DomainNet's 345 class names are not shipped here: its spec checks the domains and the
# number of classes (the class folders themselves name the classes).
DOMAINNET = DatasetSpec(
    name="domainnet",
    domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    classes=(),
    num_classes=345,
)

SPECS: dict[str, DatasetSpec] = {s.name: s for s in (PACS, VLCS, OFFICE_HOME, DOMAINNET)}


def detect_spec(domains: list[str]) -> DatasetSpec | None:
    """The known spec whose domains include all of ``domains``, if any."""
    for spec in SPECS.values():
        if domains and set(domains) <= set(spec.domains):
            return spec
    return None


def class_to_text(name: str) -> str:
    """Folder name to the words a prompt uses: ``Alarm_Clock`` -> ``Alarm Clock``."""
    return name.replace("_", " ").strip()
