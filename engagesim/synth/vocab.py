"""Word lists the synthetic world writes posts from: topics, languages, sentiment, brands."""

from __future__ import annotations

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "words": "match goal team season coach league final score player stadium win fans derby transfer cup".split(),
        "hashtags": "GameDay Football NBA MatchDay Champions".split(),
        "domains": "espn.com bbc.co.uk skysports.com".split(),
    },
    "tech": {
        "words": "launch app update cloud chip device software data privacy beta release feature code server AI".split(),
        "hashtags": "Tech AI Cloud DevOps Launch".split(),
        "domains": "techcrunch.com theverge.com github.com".split(),
    },
    "food": {
        "words": "recipe breakfast coffee pizza burger taste menu fresh delicious order brunch dessert spicy vegan".split(),
        "hashtags": "Foodie Recipe Brunch CoffeeTime Yum".split(),
        "domains": "foodnetwork.com allrecipes.com ubereats.com".split(),
    },
    "music": {
        "words": "album track tour concert single live stage guitar playlist remix festival lyrics vinyl band".split(),
        "hashtags": "NewMusic NowPlaying Tour Festival Vinyl".split(),
        "domains": "spotify.com youtube.com billboard.com".split(),
    },
    "news": {
        "words": "report election policy government vote minister budget court crisis city council law debate".split(),
        "hashtags": "Breaking Politics Election News Policy".split(),
        "domains": "reuters.com apnews.com cbc.ca".split(),
    },
    "travel": {
        "words": "flight beach hotel trip island city weekend adventure passport sunset hike road journey view".split(),
        "hashtags": "Travel Wanderlust Vacation Explore Beach".split(),
        "domains": "booking.com lonelyplanet.com tripadvisor.com".split(),
    },
    "fashion": {
        "words": "style collection dress runway look outfit season trend designer shoes model wear spring bold".split(),
        "hashtags": "OOTD Fashion Style NYFW Trend".split(),
        "domains": "vogue.com zara.com hm.com".split(),
    },
    "gaming": {
        "words": "game patch level boss stream squad ranked console quest loot raid esports release skin map".split(),
        "hashtags": "Gaming Esports Twitch GamerLife NewGame".split(),
        "domains": "twitch.tv ign.com steampowered.com".split(),
    },
    "finance": {
        "words": "market stocks earnings growth rate investors quarter revenue bank crypto shares profit fund".split(),
        "hashtags": "Markets Investing Crypto Earnings Stocks".split(),
        "domains": "bloomberg.com ft.com wsj.com".split(),
    },
    "movies": {
        "words": "trailer premiere film cast director sequel scene cinema release episode series watch actor".split(),
        "hashtags": "Movies Trailer Premiere Netflix Cinema".split(),
        "domains": "imdb.com netflix.com rottentomatoes.com".split(),
    },
    "science": {
        "words": "study research space planet climate cells discovery lab data ocean species telescope energy".split(),
        "hashtags": "Science Space Climate Research NASA".split(),
        "domains": "nature.com nasa.gov sciencemag.org".split(),
    },
    "pets": {
        "words": "dog cat puppy kitten adopt rescue walk treat cute paws shelter vet furry friend".split(),
        "hashtags": "DogsOfTwitter CatsOfTwitter AdoptDontShop Pets Puppy".split(),
        "domains": "petfinder.org aspca.org chewy.com".split(),
    },
}
TOPIC_NAMES = list(TOPICS)

# Language, its share of users, and function words mixed into its posts.
LANGUAGES: dict[str, tuple[float, list[str]]] = {
    "en": (0.55, "the a and to of in for with this our is".split()),
    "es": (0.16, "el la y de en para con este nuestro es".split()),
    "ja": (0.11, "の に は を と が で も から まで".split()),
    "pt": (0.08, "o a e de em para com este nosso é".split()),
    "fr": (0.06, "le la et de en pour avec ce notre est".split()),
    "de": (0.04, "der die und zu von in für mit dieser ist".split()),
}
LANGUAGE_NAMES = list(LANGUAGES)

POSITIVE = "amazing love great happy excited best awesome beautiful thrilled proud".split()
NEGATIVE = "terrible sad angry worst disappointed awful broken annoying".split()
QUESTIONS = ["What do you think?", "Who's in?", "Which one is your favourite?", "Ready?", "Guess what?"]
CALLS_TO_ACTION = ["Order now", "Read more", "Watch now", "Link in bio", "Don't miss it", "Join us"]

BRAND_STEMS = (
    "Nova Apex Lumen Vertex Orbit Cedar Harbor Summit Pixel Atlas Ember Quill Maple Zenith Coral Drift "
    "Falcon Ivory Juniper Koi Lark Meadow Nimbus Onyx Pepper Quartz Raven Sable Tidal Umbra Velvet Willow"
).split()
BRAND_SUFFIXES = "Foods Labs Media Sports Studios Air Bank Wear Games Coffee Motors News".split()
