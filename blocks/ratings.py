"""Ratings of the bot's replies (👍 / 👎 / 🔄 другой ответ): the table tg_bot.py writes into its
SQLite database and create_dataset.py --feedback reads back, defined once for both.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses (sqlite3, json, hashlib, os).

One row per reply the bot sent with rating buttons. `prompt` is the prompt rule's text exactly as
the model was given it, and `prompt_ids` its token ids (a JSON list), so a training run can check
that it trains on what was served. `label` is LIKED, DISLIKED or NULL (not rated yet; a second
press overwrites the first). A reply written by 🔄 names the reply it replaces in `replaces`: the
two are a pair, the newer one preferred unless the ratings say otherwise. `model` is the model
folder's name and `model_hash` a hash of its weights (model_fingerprint), so that ratings of one
model never silently train another.
"""
LIKED = 1
DISLIKED = 0
RATINGS_TABLE = "ratings"
RATINGS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ratings ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "chat_id INTEGER NOT NULL, "
    "user_id INTEGER NOT NULL, "
    "message_id INTEGER, "          # the bot's message carrying the reply and its buttons
    "prompt TEXT NOT NULL, "
    "prompt_ids TEXT NOT NULL, "    # JSON list of token ids
    "prompt_tokens INTEGER NOT NULL, "
    "reply TEXT NOT NULL, "
    "label INTEGER, "               # LIKED, DISLIKED or NULL
    "replaces INTEGER, "            # id of the reply 🔄 replaced, or NULL
    "model TEXT NOT NULL, "
    "model_hash TEXT NOT NULL, "
    "created REAL NOT NULL, "
    "rated REAL)"
)
RATINGS_INDEX = "CREATE INDEX IF NOT EXISTS ratings_message ON ratings (chat_id, message_id)"
FINGERPRINT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")
FINGERPRINT_CHUNK = 1 << 20


def model_fingerprint(folder):
    """A short hash of a model folder's weights (sha256 over the weight files, in name order,
    first 16 hex digits); of config.json where the folder has no weights (a --server bot), so a
    ratings row always says which model wrote the reply."""
    folder = os.fspath(folder)
    names = sorted(name for name in os.listdir(folder)
                   if name in FINGERPRINT_FILES or (name.startswith("model-") and name.endswith(".safetensors")))
    if not names:
        names = [name for name in ("config.json",) if os.path.isfile(os.path.join(folder, name))]
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8"))
        with open(os.path.join(folder, name), "rb") as handle:
            for chunk in iter(lambda: handle.read(FINGERPRINT_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def open_ratings(db):
    """Make sure the ratings table exists in an open sqlite3 connection."""
    db.execute(RATINGS_SCHEMA)
    db.execute(RATINGS_INDEX)
    return db


def open_ratings_file(path):
    """An SQLite file holding the ratings table (made if new), for a script that keeps no other table
    (system_prompt.py --web --db): readable by its owner only, the file and its -wal and -shm files
    (regular files only: os.chmod follows a link), and deleted rows overwritten (secure_delete), so
    that a /forget leaves no words behind. One connection, shared by the caller's threads under its lock."""
    path = os.fspath(path)

    def owner_only():
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.isfile(name) and not os.path.islink(name):
                os.chmod(name, 0o600)

    owner_only()
    previous = os.umask(0o077)  # new files (the database, -wal, -shm) come out 0600
    try:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA secure_delete=ON")
        open_ratings(db)
        db.commit()
    finally:
        os.umask(previous)
    owner_only()
    return db
