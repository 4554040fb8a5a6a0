"""The bundled question-and-answer corpus of the tiny-lm demo, generated deterministically from facts.

Each fact is (domain, subject, question stem, answer). Paraphrased questions and answer openings turn
about a hundred facts into roughly a thousand training examples, as in the seeds' scenario.
"""

from __future__ import annotations

import random
import re

# fmt: off
FACTS: tuple[tuple[str, str, str, str], ...] = (
    # economics
    ("economics", "inflation", "what is inflation", "inflation is a general rise in prices that lowers what money can buy"),
    ("economics", "deflation", "what is deflation", "deflation is a general fall in prices across the economy"),
    ("economics", "gdp", "what is gdp", "gdp is the total value of goods and services produced in a country"),
    ("economics", "recession", "what is a recession", "a recession is a fall in economic activity lasting several months"),
    ("economics", "interest rate", "what is an interest rate", "an interest rate is the price of borrowing money"),
    ("economics", "central bank", "what does a central bank do", "a central bank sets interest rates and manages the money supply"),
    ("economics", "supply and demand", "what is supply and demand", "supply and demand explain how prices settle where buyers meet sellers"),
    ("economics", "unemployment", "what is unemployment", "unemployment counts people who want work but cannot find it"),
    ("economics", "tax", "what is a tax", "a tax is money the government collects to pay for public services"),
    ("economics", "tariff", "what is a tariff", "a tariff is a tax on goods imported from another country"),
    ("economics", "stock", "what is a stock", "a stock is a share of ownership in a company"),
    ("economics", "bond", "what is a bond", "a bond is a loan that an investor makes to a government or company"),
    ("economics", "budget deficit", "what is a budget deficit", "a budget deficit happens when a government spends more than it collects"),
    ("economics", "monopoly", "what is a monopoly", "a monopoly is a market with only one seller"),
    ("economics", "opportunity cost", "what is opportunity cost", "opportunity cost is the value of the best choice you give up"),
    ("economics", "exchange rate", "what is an exchange rate", "an exchange rate is the price of one currency in another"),
    ("economics", "trade", "why do countries trade", "countries trade because each can specialise in what it makes best"),
    ("economics", "bank", "what does a bank do", "a bank takes deposits and makes loans"),
    ("economics", "wage", "what is a wage", "a wage is the payment a worker receives for labour"),
    ("economics", "profit", "what is profit", "profit is revenue minus costs"),
    ("economics", "market", "what is a market", "a market is any place where buyers and sellers exchange goods"),
    ("economics", "scarcity", "what is scarcity", "scarcity means wants are larger than the resources to meet them"),
    ("economics", "money", "what is money", "money is anything widely accepted in exchange for goods"),
    ("economics", "debt", "what is debt", "debt is money that is owed and must be paid back"),
    ("economics", "savings", "why do people save money", "people save money to spend it later or to earn interest"),
    ("economics", "price", "what sets a price", "a price is set by the balance of supply and demand"),
    ("economics", "competition", "why is competition useful", "competition pushes firms to lower prices and improve quality"),
    ("economics", "productivity", "what is productivity", "productivity is output produced per hour of work"),
    ("economics", "great depression", "what was the great depression", "the great depression was a severe worldwide economic collapse in the nineteen thirties"),
    ("economics", "currency", "what is a currency", "a currency is the money used in a particular country"),
    ("economics", "investment", "what is investment", "investment is spending today to produce more in the future"),
    ("economics", "consumer", "what is a consumer", "a consumer is a person who buys goods and services"),
    ("economics", "loan", "what is a loan", "a loan is money borrowed that is repaid with interest"),
    # history
    ("history", "first president", "who was the first president of the united states", "george washington was the first president of the united states"),
    ("history", "declaration of independence", "when was the declaration of independence signed", "the declaration of independence was signed in seventeen seventy six"),
    ("history", "roman empire", "what was the roman empire", "the roman empire was a vast state ruled from rome for centuries"),
    ("history", "julius caesar", "who was julius caesar", "julius caesar was a roman general who became dictator of rome"),
    ("history", "world war one", "when did world war one begin", "world war one began in nineteen fourteen"),
    ("history", "world war two", "when did world war two end", "world war two ended in nineteen forty five"),
    ("history", "french revolution", "what was the french revolution", "the french revolution overthrew the french monarchy in seventeen eighty nine"),
    ("history", "magna carta", "what was the magna carta", "the magna carta was an english charter that limited the power of the king"),
    ("history", "abraham lincoln", "who was abraham lincoln", "abraham lincoln was the president who led the union through the civil war"),
    ("history", "civil war", "what was the american civil war", "the american civil war was fought between the union and the confederacy"),
    ("history", "berlin wall", "when did the berlin wall fall", "the berlin wall fell in nineteen eighty nine"),
    ("history", "moon landing", "when did people first land on the moon", "people first landed on the moon in nineteen sixty nine"),
    ("history", "printing press", "who invented the printing press", "johannes gutenberg invented the printing press"),
    ("history", "napoleon", "who was napoleon", "napoleon was a french emperor who conquered much of europe"),
    ("history", "cleopatra", "who was cleopatra", "cleopatra was the last active ruler of ancient egypt"),
    ("history", "industrial revolution", "what was the industrial revolution", "the industrial revolution moved work from farms to factories and machines"),
    ("history", "renaissance", "what was the renaissance", "the renaissance was a rebirth of art and learning in europe"),
    ("history", "cold war", "what was the cold war", "the cold war was a long rivalry between the united states and the soviet union"),
    ("history", "pyramids", "who built the pyramids", "the ancient egyptians built the pyramids as tombs for pharaohs"),
    ("history", "columbus", "who was christopher columbus", "christopher columbus was a sailor who crossed the atlantic in fourteen ninety two"),
    ("history", "constitution", "when was the united states constitution written", "the united states constitution was written in seventeen eighty seven"),
    ("history", "martin luther king", "who was martin luther king", "martin luther king was a leader of the civil rights movement"),
    ("history", "queen victoria", "who was queen victoria", "queen victoria ruled britain for most of the nineteenth century"),
    ("history", "great wall", "why was the great wall of china built", "the great wall of china was built to defend against invasions from the north"),
    ("history", "alexander", "who was alexander the great", "alexander the great was a king who built an empire from greece to india"),
    ("history", "vikings", "who were the vikings", "the vikings were seafaring people from scandinavia"),
    ("history", "ottoman empire", "what was the ottoman empire", "the ottoman empire was a turkish state that lasted six centuries"),
    ("history", "gandhi", "who was gandhi", "gandhi led the peaceful movement for the independence of india"),
    ("history", "titanic", "when did the titanic sink", "the titanic sank in nineteen twelve"),
    ("history", "washington", "what did george washington do", "george washington led the army in the revolution and became the first president"),
    ("history", "american revolution", "what was the american revolution", "the american revolution won independence for the united states from britain"),
    # science
    ("science", "photosynthesis", "what is photosynthesis", "photosynthesis is how plants turn light water and air into sugar"),
    ("science", "gravity", "what is gravity", "gravity is the force that pulls masses toward each other"),
    ("science", "atom", "what is an atom", "an atom is the smallest unit of a chemical element"),
    ("science", "dna", "what is dna", "dna is the molecule that carries genetic instructions"),
    ("science", "evolution", "what is evolution", "evolution is the change in living things over generations by natural selection"),
    ("science", "cell", "what is a cell", "a cell is the basic unit of life"),
    ("science", "energy", "what is energy", "energy is the ability to do work"),
    ("science", "electricity", "what is electricity", "electricity is the flow of electric charge"),
    ("science", "water", "what is water made of", "water is made of hydrogen and oxygen"),
    ("science", "sun", "what is the sun", "the sun is the star at the centre of our solar system"),
    ("science", "moon", "what is the moon", "the moon is the natural satellite that orbits the earth"),
    ("science", "planet", "what is a planet", "a planet is a large body that orbits a star"),
    ("science", "light", "how fast does light travel", "light travels about three hundred thousand kilometres each second"),
    ("science", "sound", "what is sound", "sound is a vibration that travels through air or other matter"),
    ("science", "virus", "what is a virus", "a virus is a tiny agent that can only copy itself inside living cells"),
    ("science", "bacteria", "what are bacteria", "bacteria are single celled organisms found almost everywhere"),
    ("science", "climate", "what is climate", "climate is the average weather of a place over many years"),
    ("science", "volcano", "what is a volcano", "a volcano is an opening where molten rock reaches the surface"),
    ("science", "earthquake", "what causes an earthquake", "an earthquake is caused by sudden movement of rock along a fault"),
    ("science", "newton", "who was isaac newton", "isaac newton described the laws of motion and gravity"),
    ("science", "einstein", "who was albert einstein", "albert einstein developed the theory of relativity"),
    ("science", "darwin", "who was charles darwin", "charles darwin proposed evolution by natural selection"),
    ("science", "oxygen", "why do we need oxygen", "we need oxygen so our cells can release energy from food"),
    ("science", "heart", "what does the heart do", "the heart pumps blood around the body"),
    ("science", "brain", "what does the brain do", "the brain controls thought movement and the senses"),
    ("science", "magnet", "what is a magnet", "a magnet is an object that attracts iron"),
    ("science", "acid", "what is an acid", "an acid is a substance that releases hydrogen ions in water"),
    ("science", "rainbow", "what makes a rainbow", "a rainbow forms when sunlight is bent and split by raindrops"),
    ("science", "telescope", "what is a telescope", "a telescope is an instrument that makes distant objects look closer"),
    ("science", "vaccine", "what is a vaccine", "a vaccine trains the immune system to fight a disease"),
    ("science", "periodic table", "what is the periodic table", "the periodic table arranges the chemical elements by atomic number"),
    ("science", "black hole", "what is a black hole", "a black hole is a region where gravity is so strong that light cannot escape"),
    ("science", "ecosystem", "what is an ecosystem", "an ecosystem is a community of living things and their environment"),
)
# fmt: on

QUESTION_FORMS: tuple[str, ...] = (
    "{q} ?",
    "can you tell me {q} ?",
    "please explain {q} .",
    "i wonder {q} .",
    "quick question : {q} ?",
)
ANSWER_FORMS: tuple[str, ...] = (
    "{a} .",
    "in short , {a} .",
    "simply put , {a} .",
)

QUERIES: tuple[tuple[str, str], ...] = (
    ("what is inflation ?", "inflation is a general rise in prices that lowers what money can buy ."),
    (
        "who was the first president of the united states ?",
        "george washington was the first president of the united states .",
    ),
    ("what is photosynthesis ?", "photosynthesis is how plants turn light water and air into sugar ."),
    ("what is a recession ?", "a recession is a fall in economic activity lasting several months ."),
    ("when did world war two end ?", "world war two ended in nineteen forty five ."),
    ("what is gravity ?", "gravity is the force that pulls masses toward each other ."),
    ("what is a tariff ?", "a tariff is a tax on goods imported from another country ."),
    ("who was isaac newton ?", "isaac newton described the laws of motion and gravity ."),
)


def training_examples(count: int = 1000, seed: int = 0) -> list[tuple[str, str, str]]:
    """Return `count` (domain, question, answer) examples, paraphrased and shuffled reproducibly."""
    rng = random.Random(seed)
    pool = [
        (domain, qf.format(q=question), af.format(a=answer))
        for domain, _subject, question, answer in FACTS
        for qf in QUESTION_FORMS
        for af in ANSWER_FORMS
    ]
    rng.shuffle(pool)
    return pool[:count]


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens with punctuation split off."""
    return re.findall(r"[a-z0-9]+|[?.,:]", text.lower())
