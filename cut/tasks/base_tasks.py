"""Base tasks for the verifiable-instruction prompts: our own short writing tasks, two disjoint sets.

`cut.tasks.instructions` adds 1-3 verifiable constraints to each. Every task asks for something
short (the model answers in about 120 tokens). Tasks with an `input` rewrite, summarise or answer a
question about that text. Tasks name no counts of parts ("some tips", not "three tips"): a count
constraint (bullets, sentences, paragraphs) added to them would contradict it. TRAIN and HELDOUT
share no task text and cover different subjects: TRAIN is home, food, garden, pets, work, school,
fitness, weather and town life; HELDOUT is the sea, space, music, art, mountains, insects, rocks,
board games, photography, sailing, crafts and theatre.
"""

from __future__ import annotations


def _t(task: str, input: str = "") -> dict:
    return {"task": task, "input": input}


TRAIN: tuple[dict, ...] = (
    # emails and letters
    _t("Write a short email to a neighbour asking to borrow a ladder."),
    _t("Write a short email to your landlord reporting a leaking kitchen tap."),
    _t("Write a brief email to a colleague asking to move a meeting to Thursday."),
    _t("Write a short email thanking a friend for helping you move house."),
    _t("Write a short email to a teacher explaining that your child will miss school on Friday."),
    _t("Write a brief email inviting your team to a lunch on Friday."),
    _t("Write a short email to a gym asking how to cancel a membership."),
    _t("Write a short letter to your future self about what you hope to learn this year."),
    _t("Write a short thank-you note to a bus driver who found your lost wallet."),
    _t("Write a brief email to a plumber asking for a quote to fix a blocked drain."),
    _t("Write a short email apologising to a friend for missing their birthday dinner."),
    _t("Write a short letter to a local council asking for a new bench in the park."),
    _t("Write a brief email to a shop asking whether a jacket is back in stock."),
    _t("Write a short note to a new neighbour welcoming them to the street."),
    _t("Write a short email to your manager asking for a day off next week."),
    _t("Write a brief email to a library asking to renew two borrowed books."),
    _t("Write a short letter to a grandparent describing your first week at a new job."),
    _t("Write a short email to a dog walker explaining your dog's feeding routine."),
    # stories
    _t("Write a very short story about a cat who is afraid of the vacuum cleaner."),
    _t("Write a short story about a lost umbrella that finds its way home."),
    _t("Write a very short story about a boy who bakes his first loaf of bread."),
    _t("Write a short story about two neighbours who share a garden."),
    _t("Write a very short story about a runner who finishes last but smiles."),
    _t("Write a short story about a rainy Monday morning at a bus stop."),
    _t("Write a very short story about a talking coffee mug."),
    _t("Write a short story about a girl who finds a note in a library book."),
    _t("Write a very short story about a dog waiting at the door for its owner."),
    _t("Write a short story about a tomato plant that grows taller than the fence."),
    _t("Write a very short story about a teacher's last day before retiring."),
    _t("Write a short story about a bicycle that has been in a shed for years."),
    _t("Write a very short story about a kitchen where everything goes wrong before dinner guests arrive."),
    _t("Write a short story about a snowman who wants to see summer."),
    _t("Write a very short story about an old alarm clock that refuses to ring."),
    # everyday science
    _t("Explain in a few sentences why ice floats on water."),
    _t("Explain briefly why bread goes stale."),
    _t("Explain in simple terms why the sky is blue."),
    _t("Explain in a few sentences how a rainbow forms."),
    _t("Explain briefly why onions make people cry."),
    _t("Explain in a few sentences why metal feels colder than wood at the same temperature."),
    _t("Explain in simple terms how a refrigerator keeps food cold."),
    _t("Explain briefly why we see lightning before we hear thunder."),
    _t("Explain in a few sentences why leaves change colour in autumn."),
    _t("Explain briefly why salt is put on icy roads."),
    _t("Explain in simple terms why a metal pan handle gets hot on the stove."),
    _t("Explain in a few sentences how soap removes grease from dishes."),
    _t("Explain briefly why cut apples turn brown."),
    _t("Explain in simple terms how a microwave oven heats food."),
    _t("Explain in a few sentences why we get goosebumps when we are cold."),
    _t("Explain briefly why dogs pant on a hot day."),
    _t("Explain in simple terms why a bicycle stays upright while it moves."),
    _t("Explain in a few sentences what causes fog on a cold morning."),
    _t("Explain briefly why yeast makes bread dough rise."),
    _t("Explain in simple terms why muscles feel sore a day after exercise."),
    # advice and tips
    _t("Give some tips for keeping houseplants alive."),
    _t("Give a few tips for sleeping better at night."),
    _t("Give some tips for saving money on groceries."),
    _t("Give some short advice to someone starting their first office job."),
    _t("Give some tips for studying for an exam without cramming."),
    _t("Give a few tips for training a puppy to sit."),
    _t("Give some tips for staying focused while working from home."),
    _t("Give short advice to a beginner who wants to start running."),
    _t("Give some tips for keeping a kitchen tidy."),
    _t("Give a few tips for cooking rice that is not sticky."),
    _t("Give some tips for a safe bicycle commute in a city."),
    _t("Give short advice on how to prepare for a job interview."),
    _t("Give some tips for growing herbs on a windowsill."),
    _t("Give a few tips for packing a school lunch that children will eat."),
    _t("Give some tips for keeping a cat entertained indoors."),
    _t("Give short advice to someone who keeps forgetting their keys."),
    _t("Give some tips for drinking more water during the day."),
    _t("Give a few tips for reducing food waste at home."),
    _t("Give some tips for writing a clear to-do list."),
    _t("Give short advice on staying warm at home in winter without high heating bills."),
    _t("Give some tips for making a small flat feel bigger."),
    _t("Give a few tips for getting along with a new flatmate."),
    # product descriptions
    _t("Write a short product description for a reusable water bottle."),
    _t("Write a brief product description for a pair of running shoes."),
    _t("Write a short product description for a desk lamp with adjustable brightness."),
    _t("Write a short product description for a wooden chopping board."),
    _t("Write a brief product description for a dog bed that can be washed in a machine."),
    _t("Write a short product description for a folding umbrella."),
    _t("Write a brief product description for a set of gardening gloves."),
    _t("Write a short product description for a slow cooker."),
    _t("Write a short product description for a school backpack."),
    _t("Write a brief product description for an alarm clock that wakes you with light."),
    _t("Write a short product description for a yoga mat."),
    _t("Write a short advertisement for a neighbourhood bakery."),
    _t("Write a short advertisement for a second-hand bicycle you want to sell."),
    # definitions
    _t("Define the word 'compost' in a few sentences."),
    _t("Explain what a budget is to a ten-year-old."),
    _t("Define the word 'procrastination' and give an example."),
    _t("Explain what a mortgage is in simple terms."),
    _t("Define 'humidity' in a few sentences."),
    _t("Explain what a vaccine does in simple terms."),
    _t("Define the word 'commute' and use it in a sentence."),
    _t("Explain what interest on a savings account means."),
    _t("Define 'recycling' briefly."),
    _t("Explain what a calorie is in simple terms."),
    _t("Define the word 'deadline' and say why deadlines help."),
    # poems
    _t("Write a short poem about a cup of morning tea."),
    _t("Write a short poem about rain on a window."),
    _t("Write a short poem about a lazy Sunday afternoon."),
    _t("Write a short poem about a dog chasing its tail."),
    _t("Write a short poem about the first snow of winter."),
    _t("Write a short poem about a busy train station."),
    _t("Write a short poem about a vegetable garden in summer."),
    _t("Write a short poem about the last day of school."),
    _t("Write a short poem about a kettle coming to the boil."),
    _t("Write a short poem about an autumn walk in the park."),
    # comparisons
    _t("Compare cats and dogs as pets in a few sentences."),
    _t("Compare taking the bus and cycling to work in a few sentences."),
    _t("Compare baking and frying as ways to cook potatoes."),
    _t("Compare studying in the morning with studying at night."),
    _t("Compare renting a flat with buying a house in a few sentences."),
    _t("Compare tea and coffee in a few sentences."),
    _t("Compare e-books and paper books briefly."),
    _t("Compare walking and swimming as forms of exercise."),
    _t("Compare working from home with working in an office."),
    _t("Compare summer and winter in a few sentences."),
    # how-to steps
    _t("Describe the steps to make a cup of tea."),
    _t("Describe briefly how to boil an egg."),
    _t("Describe the steps to repot a houseplant."),
    _t("Describe briefly how to change a flat tyre on a bicycle."),
    _t("Describe the steps to make a simple salad."),
    _t("Describe briefly how to wash a woollen jumper by hand."),
    _t("Describe the steps to plan a weekly food shop."),
    _t("Describe briefly how to start a compost heap."),
    _t("Describe the steps to give a dog a bath."),
    _t("Describe briefly how to iron a shirt."),
    _t("Describe the steps to set up a simple weekly budget."),
    _t("Describe briefly how to stretch after a run."),
    _t("Describe the steps to make pancakes."),
    _t("Describe briefly how to clean a bathroom mirror without streaks."),
    # lists and short answers
    _t("List a few things to check before leaving the house for a holiday."),
    _t("List some healthy snacks for an afternoon at the office."),
    _t("List a few ways to make a birthday party for a child special."),
    _t("List some reasons to walk to school instead of being driven."),
    _t("List a few vegetables that grow well in a small garden."),
    _t("List some ways to be a good neighbour."),
    _t("List a few things a new cat owner should buy."),
    _t("List some simple breakfasts that take under five minutes."),
    _t("Name a few benefits of keeping a diary."),
    _t("Suggest a few names for a new coffee shop."),
    _t("Suggest a few indoor games for a rainy afternoon."),
    _t("Suggest a few ideas for a cheap date in town."),
    _t("Describe your ideal weekend breakfast in a few sentences."),
    _t("Describe a busy supermarket on a Saturday morning in a few sentences."),
    _t("Write a short speech to thank volunteers who cleaned up a local park."),
    _t("Write a short review of a neighbourhood pizza restaurant."),
    _t("Write a short motivational message for someone starting a new diet."),
    _t("Write a short welcome message for new members of a running club."),
    _t("Write a short notice for an office kitchen asking people to wash their mugs."),
    _t("Write a short text message telling a friend you are running late."),
    # rewriting, summarising and changing tone
    _t(
        "Rewrite the following text in a more polite tone.",
        "Turn your music down. It is midnight and some of us have work tomorrow.",
    ),
    _t(
        "Rewrite the following text so that a young child could understand it.",
        "Plants use sunlight, water and carbon dioxide to make sugar, releasing oxygen as a by-product.",
    ),
    _t(
        "Summarise the following text in plain words.",
        "The school will close early on Friday because of a staff training day. Pupils should be "
        "collected at noon. After-school clubs are cancelled.",
    ),
    _t(
        "Rewrite the following text in a more formal tone.",
        "Hey, the printer's broken again. Can someone sort it out? It's driving me mad.",
    ),
    _t(
        "Rewrite the following text in a friendlier tone.",
        "Your parcel was not delivered because nobody was home. Collect it from the depot.",
    ),
    _t(
        "Summarise the following text briefly.",
        "Regular walking strengthens the heart and lungs. It also improves mood and helps people "
        "sleep better. Even a short daily walk makes a difference.",
    ),
    _t(
        "Rewrite the following text as an enthusiastic announcement.",
        "The café on Mill Street now sells soup. It is available from noon.",
    ),
    _t(
        "Rewrite the following text more concisely.",
        "In my personal opinion, I honestly think that we should probably try to leave the house "
        "a little bit earlier in the mornings so that we are not late.",
    ),
    _t(
        "Rewrite the following complaint as a calm and constructive message.",
        "The gym showers have been cold for a week and nobody cares. This is ridiculous.",
    ),
    _t(
        "Summarise the following text for a busy reader.",
        "The community garden needs volunteers on Saturday mornings. Tasks include weeding, "
        "watering and harvesting. Tools and gloves are provided.",
    ),
    _t(
        "Rewrite the following text from the point of view of the cat.",
        "The cat sat by the window all morning, watching birds on the fence.",
    ),
    _t(
        "Rewrite the following instructions in a cheerful tone.",
        "Remove shoes at the door. Wash your hands before eating. Put dishes in the sink.",
    ),
    _t(
        "Explain the following sentence in your own words.",
        "A stitch in time saves nine.",
    ),
    _t(
        "Rewrite the following weather report as a short message to a friend.",
        "Heavy rain is expected tomorrow afternoon, with strong winds along the coast road.",
    ),
    # questions about a passage
    _t(
        "Read the passage and explain why Maria was late.",
        "Maria left home at eight as usual, but the bridge was closed for repairs. She had to take "
        "a long detour and arrived at work forty minutes late.",
    ),
    _t(
        "Read the passage and say what the children should bring.",
        "On Thursday the class will visit the farm. Children should bring a packed lunch, boots "
        "and a raincoat. The bus leaves at nine.",
    ),
    _t(
        "Read the passage and explain what went wrong with the cake.",
        "Tom forgot to add baking powder to the mixture. He baked it for the usual time, but the "
        "cake came out flat and dense.",
    ),
    _t(
        "Read the passage and say what the landlord promised.",
        "The landlord said the heating would be repaired by Monday and that the rent for the "
        "cold week would be reduced.",
    ),
    _t(
        "Read the passage and describe how the dog behaves in the evening.",
        "Every evening at six, Biscuit sits by the door. When he hears footsteps, he wags his tail "
        "and runs to fetch his lead.",
    ),
    _t(
        "Read the passage and explain what the new recycling rule is.",
        "From next month, glass must go in the blue box and paper in the green bag. Plastic bottles "
        "are collected every other Tuesday.",
    ),
    _t(
        "Read the passage and say whether the match will go ahead.",
        "The football pitch is waterlogged after the storm. The referee will inspect it at ten and "
        "decide whether Saturday's match can be played.",
    ),
    _t(
        "Read the passage and explain what the doctor advised.",
        "The doctor told Sam to rest his ankle for a week, keep it raised in the evenings and avoid "
        "running until the swelling goes down.",
    ),
)

HELDOUT: tuple[dict, ...] = (
    # the sea and sea life
    _t("Write a short email to a friend describing a day at an aquarium."),
    _t("Explain in a few sentences why the sea is salty."),
    _t("Explain briefly what causes ocean tides."),
    _t("Write a very short story about a lighthouse keeper during a storm."),
    _t("Give some tips for exploring rock pools safely."),
    _t("Write a short poem about waves breaking on a pebble beach."),
    _t("Define the word 'coral reef' in a few sentences."),
    _t("Compare dolphins and sharks in a few sentences."),
    # space
    _t("Explain in simple terms why the Moon has phases."),
    _t("Explain briefly why stars twinkle."),
    _t("Write a very short story about an astronaut who misses the smell of rain."),
    _t("Write a short poem about a night sky full of stars."),
    _t("Give a few tips for watching a meteor shower."),
    _t("Compare Mars and Venus in a few sentences."),
    _t("Define the word 'comet' briefly."),
    _t("Write a short letter from a space station to a class of schoolchildren."),
    # music
    _t("Give some tips for a beginner learning the guitar."),
    _t("Explain in a few sentences how a drum makes sound."),
    _t("Write a short product description for a ukulele."),
    _t("Compare the piano and the violin as first instruments."),
    _t("Write a very short story about a choir singing in an empty church."),
    _t("Write a short email inviting friends to your band's first concert."),
    _t("Define the word 'rhythm' in a few sentences."),
    _t("Describe briefly how to tune a guitar by ear."),
    # art and museums
    _t("Write a short review of an exhibition of landscape paintings."),
    _t("Give a few tips for visiting a large art museum in one afternoon."),
    _t("Write a very short story about a statue that comes to life at night."),
    _t("Explain briefly what watercolour painting is."),
    _t("Write a short description of a sculpture garden for a visitor guide."),
    _t("Compare drawing with a pencil and painting with oils."),
    # mountains, hiking and camping
    _t("Give some tips for a first night of camping in a tent."),
    _t("Explain in a few sentences why it is colder at the top of a mountain."),
    _t("Describe the steps to pitch a small tent."),
    _t("Write a short poem about reaching a mountain summit at dawn."),
    _t("Write a short product description for a lightweight hiking backpack."),
    _t("List a few things to pack for a day hike in the hills."),
    _t("Write a very short story about two hikers who get lost in mist."),
    # insects and bees
    _t("Explain in simple terms how bees make honey."),
    _t("Explain briefly why ants walk in lines."),
    _t("Write a very short story about a ladybird on a long journey."),
    _t("Give a few tips for attracting butterflies."),
    _t("Compare bees and wasps in a few sentences."),
    # rocks and volcanoes
    _t("Explain in a few sentences why volcanoes erupt."),
    _t("Define the word 'fossil' briefly."),
    _t("Explain briefly how caves are formed."),
    _t("Write a short poem about an old volcano that has gone quiet."),
    _t("Describe briefly how to start a small collection of interesting stones."),
    # board games and chess
    _t("Give some tips for a beginner learning chess."),
    _t("Write a short email inviting neighbours to a board game evening."),
    _t("Explain briefly why chess players think several moves ahead."),
    _t("Write a very short story about a chess piece that wants to be the queen."),
    _t("Suggest a few board games for a family with young children."),
    # photography
    _t("Give a few tips for taking better photos with a phone."),
    _t("Explain in simple terms what a camera lens does."),
    _t("Write a short product description for a compact travel camera."),
    _t("Describe the steps to frame a good portrait photo."),
    # sailing and boats
    _t("Explain briefly how a sailboat can move against the wind."),
    _t("Write a very short story about a fishing boat returning at sunset."),
    _t("Give some tips for someone on their first sailing trip."),
    _t("Write a short poem about a small rowing boat on a lake."),
    # crafts: knitting and pottery
    _t("Describe briefly how to cast on stitches when learning to knit."),
    _t("Give a few tips for a beginner at a pottery wheel."),
    _t("Write a short advertisement for a weekend knitting workshop."),
    _t("Explain in a few sentences why clay pots are fired in a kiln."),
    # theatre
    _t("Write a short speech to thank the cast after a school play."),
    _t("Give some tips for overcoming stage fright."),
    _t("Write a short review of an outdoor theatre performance."),
    # rewriting, summarising and passages on these subjects
    _t(
        "Make the message below sound more exciting.",
        "The museum has a new room of old maps. It opens on Tuesday.",
    ),
    _t(
        "Condense the passage below into a short summary.",
        "Sea turtles return to the beach where they hatched to lay their own eggs. The journey can "
        "cover thousands of kilometres. Scientists think they use the Earth's magnetic field to find the way.",
    ),
    _t(
        "Retell the passage below so that a young child could follow it.",
        "A solar eclipse occurs when the Moon passes between the Sun and the Earth, blocking the Sun's light.",
    ),
    _t(
        "Make the message below sound more formal.",
        "The concert was awesome, the drummer totally stole the show and the crowd went wild.",
    ),
    _t(
        "Make the message below sound warmer and friendlier.",
        "Chess club is cancelled this week. Do not come to the hall.",
    ),
    _t(
        "Read the passage and explain why the climbers turned back.",
        "The climbers were only two hundred metres from the summit when thick cloud rolled in. With "
        "snow starting to fall and daylight fading, they decided to descend.",
    ),
    _t(
        "Read the passage and say what the bees do in winter.",
        "In winter, honeybees stay inside the hive. They cluster together and shiver their wing "
        "muscles to keep the queen warm.",
    ),
    _t(
        "Read the passage and describe what the photographer was waiting for.",
        "Lena stood on the cliff for an hour with her camera ready. She wanted the exact moment the "
        "setting sun lit up the old lighthouse.",
    ),
    _t(
        "Read the passage and explain what happened to the sailing race.",
        "The sailing race was postponed because the wind dropped to almost nothing. The boats drifted "
        "near the start line until the organisers called it off.",
    ),
    _t(
        "Give a brief summary of the passage below.",
        "The pottery class meets on Wednesday evenings. Beginners learn to shape bowls by hand before "
        "moving to the wheel. All clay and glazes are included in the fee.",
    ),
)
