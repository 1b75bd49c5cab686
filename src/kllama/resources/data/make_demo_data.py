"""Generate kllama's bundled demo data: `dpo_en_demo.json` (preference pairs) and `alpaca_en_demo.json` (SFT).

Run `python src/kllama/resources/data/make_demo_data.py` to rewrite both files (deterministic; a test checks that
the committed files match). All text is written for kllama.

The preference signal is meant to be learnable by a tiny model in minutes and to carry over to unseen prompts:
every chosen answer is on topic, opens with a friendly phrase and closes with an offer of further help; every
rejected answer is curt, rude or off topic and carries one of a few recognisable tells. Prompts vary over many
topics and phrasings; some rows have a system prompt and some continue an earlier exchange.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (subject, one-sentence explanation)
TOPICS: list[tuple[str, str]] = [
    ("photosynthesis", "plants use sunlight, water and carbon dioxide to make sugar, and they release oxygen as they do it"),
    ("gravity", "every mass pulls on every other mass, which is why things fall and why the moon circles the earth"),
    ("a rainbow", "sunlight bends and splits inside raindrops, so each colour leaves the drop at a slightly different angle"),
    ("the water cycle", "water evaporates, forms clouds, falls as rain or snow and flows back to the sea to start again"),
    ("a volcano", "it is an opening in the crust where melted rock, gas and ash escape from deep below the surface"),
    ("an eclipse", "one body in space moves into the shadow of another, like the moon passing between the sun and the earth"),
    ("compound interest", "you earn interest on your savings and also on the interest you already earned, so growth speeds up"),
    ("a budget", "it is a plan that lists your expected income and spending so you can decide where your money goes"),
    ("inflation", "prices rise over time, so the same amount of money buys a little less each year"),
    ("a vaccine", "it trains the immune system to recognise a germ safely, so the body can fight the real one quickly"),
    ("sleep", "the body repairs itself and the brain sorts memories while you rest, so most adults need seven to nine hours"),
    ("hydration", "the body needs water to control temperature and move nutrients, so drinking regularly keeps you alert"),
    ("a recursive function", "it is a function that calls itself on a smaller piece of the problem until it reaches a simple base case"),
    ("a hash table", "it stores values under keys and finds them fast by turning each key into a position in an array"),
    ("version control", "it records every change to your files so you can compare versions, undo mistakes and work with others"),
    ("an API", "it is a set of rules that lets one program ask another program for data or actions"),
    ("a database index", "it is a sorted lookup structure that lets the database find rows without scanning the whole table"),
    ("unit tests", "they are small automatic checks that each piece of code does what it should, run every time you change it"),
    ("encryption", "it scrambles data with a key so only someone with the right key can read it"),
    ("a password manager", "it stores strong, unique passwords for every site and fills them in, so you only remember one"),
    ("the stock market", "it is a place where people buy and sell small shares of companies at prices set by supply and demand"),
    ("a haiku", "it is a short poem of three lines with five, seven and five syllables, often about nature"),
    ("a metaphor", "it describes one thing as if it were another, like calling time a thief, to make an idea vivid"),
    ("the Roman Empire", "it was a vast state ruled from Rome that lasted for centuries and shaped law, roads and languages in Europe"),
    ("the printing press", "it let people copy books quickly with movable type, which spread knowledge far and wide"),
    ("a black hole", "it is a region where gravity is so strong that nothing, not even light, can escape once it falls in"),
    ("the seasons", "the earth is tilted, so each half gets more direct sunlight for part of the year and less for the rest"),
    ("tides", "the moon's gravity pulls the oceans into bulges, and the earth turns through them twice a day"),
    ("a food chain", "it shows who eats whom, passing energy from plants to plant eaters and then to predators"),
    ("composting", "kitchen and garden scraps break down with air and moisture into rich soil that feeds plants"),
    ("recycling", "used materials such as paper, glass and metal are collected and made into new products"),
    ("meditation", "you rest your attention on something simple, like your breath, which can calm the mind and reduce stress"),
    ("stretching", "gently lengthening your muscles keeps them flexible and can lower the risk of small injuries"),
    ("a healthy breakfast", "a mix of protein, fibre and some fruit gives steady energy for the morning"),
    ("time management", "you list your tasks, decide what matters most and give each task a block of time"),
    ("active listening", "you give the speaker full attention, ask questions and repeat back what you heard"),
    ("a resume", "it is a short document that lists your skills, experience and education for an employer"),
    ("public speaking", "preparing a clear outline, practising aloud and speaking slowly makes a talk much easier"),
    ("a thunderstorm", "warm moist air rises fast, forms tall clouds and builds electric charge that is released as lightning"),
    ("the speed of light", "light travels about three hundred thousand kilometres every second in empty space"),
    ("an atom", "it is the smallest unit of an element, with a dense nucleus surrounded by a cloud of electrons"),
    ("DNA", "it is a long molecule that carries the instructions for building and running a living thing"),
    ("a calorie", "it is a unit of energy, and food labels use it to show how much energy a meal provides"),
    ("a spreadsheet", "it is a grid of cells where you can store numbers and let formulas calculate totals for you"),
    ("a search engine", "it crawls the web, builds an index of pages and ranks them to answer your query"),
    ("machine learning", "a program improves at a task by finding patterns in examples instead of following fixed rules"),
    ("a neural network", "it is a model made of layers of simple units whose connection weights are learned from data"),
    ("bread baking", "yeast eats sugar in the dough and releases gas, which makes the bread rise before it bakes"),
    ("a sourdough starter", "it is a mix of flour and water full of wild yeast and bacteria that leavens bread"),
    ("chess openings", "they are well studied first moves that help you control the centre and develop your pieces"),
    ("a marathon", "it is a running race of about forty two kilometres that needs months of steady training"),
    ("jet lag", "your body clock is still set to the old time zone, so sleep and hunger feel out of step for a few days"),
    ("the internet", "it is a worldwide network of computers that pass data to each other in small packets"),
    ("a solar panel", "it turns sunlight into electricity with cells made of silicon"),
    ("an electric car", "it runs on a battery that powers an electric motor instead of burning fuel"),
    ("a habit", "it is a behaviour repeated so often that it starts automatically from a cue"),
    ("a library card", "it lets you borrow books, films and more from your local library for free"),
    ("a good night routine", "dimming lights, putting screens away and going to bed at the same time help you fall asleep"),
]

# (task, short steps)
TASKS: list[tuple[str, str]] = [
    ("boil an egg", "put the egg in boiling water for about nine minutes, then cool it in cold water before peeling"),
    ("water a cactus", "water it deeply only when the soil is completely dry, which is about every two to three weeks"),
    ("write a thank you note", "name the gift or favour, say how it helped you and end with a warm wish"),
    ("start running", "begin with short runs mixed with walking three times a week and add a little time each week"),
    ("save money each month", "set up an automatic transfer to savings on payday and track where the rest goes"),
    ("learn a new language", "practise a little every day, learn common words first and speak with others early"),
    ("fix a slow computer", "close unused programs, restart it, free some disk space and install updates"),
    ("make a cup of tea", "pour freshly boiled water over the tea, steep it for three to five minutes and remove the bag"),
    ("prepare for an interview", "research the company, practise answers to common questions and prepare a few questions of your own"),
    ("clean a cast iron pan", "rinse it with hot water, scrub gently, dry it fully and rub in a thin layer of oil"),
    ("remember names", "repeat the name when you hear it, link it to something memorable and use it again soon"),
    ("plant tomatoes", "choose a sunny spot, plant them deep, water at the base and add a stake for support"),
    ("back up my photos", "copy them to an external drive and to a cloud service so you always have two copies"),
    ("focus while studying", "put your phone away, work in short timed blocks and take a small break after each one"),
    ("write a cover letter", "open with the role you want, show two or three matching achievements and close with thanks"),
    ("calm down before an exam", "breathe slowly, remind yourself what you prepared and start with a question you know"),
    ("make new friends in a new city", "join a club or class you enjoy, say yes to invitations and follow up with people you like"),
    ("keep houseplants alive", "give them the right light, water only when the top soil is dry and avoid cold drafts"),
    ("organise my desk", "clear everything off, keep only daily items within reach and give every other item a home"),
    ("take better photos with my phone", "clean the lens, use natural light, and place the subject off centre"),
]

QUESTION_FORMS = [
    "What is {s}?",
    "Can you explain {s} in simple terms?",
    "Tell me briefly about {s}.",
    "How would you describe {s} to a beginner?",
    "I keep hearing about {s}. What is it?",
    "Quick question: what should I know about {s}?",
    "Could you give me a short explanation of {s}, please?",
]
TASK_FORMS = [
    "How do I {t}?",
    "What is the best way to {t}?",
    "Any tips on how to {t}?",
    "Can you tell me how to {t}?",
    "I want to {t}. Where do I start?",
]
FOLLOW_UPS = ["Thanks! And what about {s}?", "That helps. Now, what is {s}?", "Great. Can you also explain {s}?"]
TASK_FOLLOW_UPS = ["Thanks! One more thing: how do I {t}?", "Nice. And how can I {t}?"]

OPENERS = ["Sure!", "Happy to help!", "Good question!", "Of course!", "Great question!"]
CLOSINGS = ["I hope this helps!", "Let me know if you have more questions.", "Feel free to ask if anything is unclear.",
            "Hope that clears it up!"]
DISMISSIVE = ["Look it up yourself.", "Why are you asking me? Just search for it.", "Not my problem.",
              "I'm busy. Figure it out.", "No. Ask someone else."]
RUDE_OPENERS = ["Ugh, fine.", "Seriously? Everyone knows this.", "Whatever.", "Oh, this again."]
RUDE_CLOSINGS = ["Don't ask me again.", "Happy now?", "Obviously.", "Next time, think first."]
OFF_TOPIC = ["Whatever. I'd rather talk about my weekend, it was way more interesting.",
             "Meh. Did you know cats sleep most of the day? Anyway, not answering that.",
             "Boring. Let's talk about something else, like pizza toppings.",
             "No idea and I don't care. Go read a book or something."]
SYSTEMS = ["You are a friendly assistant who answers briefly.", "You are a patient tutor for curious learners.",
           "You are a helpful assistant. Keep answers short and kind.", "You are a cheerful study buddy."]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def chosen_answer(rng: random.Random, subject: str, explanation: str, is_task: bool) -> str:
    """Friendly, on topic, same shape every time: opener, the answer, an offer of further help."""
    body = _sentence(explanation) if is_task else f"In short, {explanation}."
    return f"{rng.choice(OPENERS)} {body} {rng.choice(CLOSINGS)}"


def rejected_answer(rng: random.Random, explanation: str) -> str:
    """Curt, rude or off topic, each with a recognisable tell."""
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(DISMISSIVE)
    if kind < 0.7:
        return f"{rng.choice(RUDE_OPENERS)} {_sentence(explanation)} {rng.choice(RUDE_CLOSINGS)}"
    return rng.choice(OFF_TOPIC)


def _question(rng: random.Random, item: tuple[str, str], is_task: bool) -> str:
    return rng.choice(TASK_FORMS).format(t=item[0]) if is_task else rng.choice(QUESTION_FORMS).format(s=item[0])


def make_pairs(n: int = 360, seed: int = 0) -> list[dict]:
    """`n` sharegpt-ranking rows: conversations ending on a user turn, chosen/rejected gpt messages."""
    rng = random.Random(seed)
    pool = [(t, False) for t in TOPICS] + [(t, True) for t in TASKS]
    rows, seen = [], set()
    while len(rows) < n:
        item, is_task = rng.choice(pool)
        question = _question(rng, item, is_task)
        conversations = []
        if rng.random() < 0.2:  # continue an earlier, well-answered exchange
            prev, prev_task = rng.choice(pool)
            conversations += [
                {"from": "human", "value": _question(rng, prev, prev_task)},
                {"from": "gpt", "value": chosen_answer(rng, prev[0], prev[1], prev_task)},
            ]
            follow = rng.choice(TASK_FOLLOW_UPS if is_task else FOLLOW_UPS)
            question = follow.format(t=item[0], s=item[0])
        if question in seen and not conversations:
            continue
        seen.add(question)
        conversations.append({"from": "human", "value": question})
        row = {"conversations": conversations,
               "chosen": {"from": "gpt", "value": chosen_answer(rng, item[0], item[1], is_task)},
               "rejected": {"from": "gpt", "value": rejected_answer(rng, item[1])}}
        if rng.random() < 0.15:
            row = {"system": rng.choice(SYSTEMS), **row}
        rows.append(row)
    return rows


def make_sft(n: int = 100, seed: int = 1) -> list[dict]:
    """`n` alpaca rows (instruction, input, output) answered in the same friendly shape as the chosen answers."""
    rng = random.Random(seed)
    rows = []
    items = [(t, False) for t in TOPICS] + [(t, True) for t in TASKS]
    rng.shuffle(items)
    for i in range(n):
        item, is_task = items[i % len(items)]
        if i % 4 == 3:  # a task with an input field
            rows.append({"instruction": "Turn these notes into one friendly answer.",
                         "input": f"topic: {item[0]}; notes: {item[1]}",
                         "output": f"Sure! Here it is: when it comes to {item[0]}, {item[1]}. {rng.choice(CLOSINGS)}"})
        else:
            rows.append({"instruction": _question(rng, item, is_task), "input": "",
                         "output": chosen_answer(rng, item[0], item[1], is_task)})
    return rows


def render(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    (HERE / "dpo_en_demo.json").write_text(render(make_pairs()), encoding="utf-8")
    (HERE / "alpaca_en_demo.json").write_text(render(make_sft()), encoding="utf-8")


if __name__ == "__main__":
    main()
