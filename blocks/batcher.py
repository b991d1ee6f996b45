"""The batcher: one model thread that generates the replies of several conversations together
(the Telegram bot's chats, the web chat's browser sessions), or the same interface over an
inference server.

A block: blocks/build.py writes this file into the scripts that list it (make blocks).
It imports nothing itself; its host script imports what it uses."""


class TokenizerPool:
    """Copies of the tokenizer, lent to one thread at a time: a fast tokenizer is one
    Rust object whose settings every call mutates, and sharing it across threads
    can fail with "Already borrowed". A copy takes a fifth of a second and a few MB,
    so a few are made at the start rather than one in every worker."""

    def __init__(self, tokenizer, copies):
        self.free = queue.SimpleQueue()
        for _ in range(copies):
            self.free.put(copy.deepcopy(tokenizer))

    @contextlib.contextmanager
    def borrow(self):
        tokenizer = self.free.get()
        try:
            yield tokenizer
        finally:
            self.free.put(tokenizer)


class ReplyRequest:
    """A prompt waiting for the model (its ids, and its text for a server), then its reply or
    the error instead; with stream, also the visible text of the reply while it is written."""

    def __init__(self, prompt, tokens, stream=False, prompt_text=None):
        self.prompt, self.tokens, self.stream, self.prompt_text = prompt, tokens, stream, prompt_text
        self.arrived = time.monotonic()
        self.visible = ""
        self.reply = self.error = None
        self.done = threading.Event()
        self.changed = threading.Condition()

    def show(self, text):
        """The reply so far (from the thread that generates: it only stores the text)."""
        with self.changed:
            self.visible = text
            self.changed.notify_all()

    def finish(self, reply=None, error=None):
        with self.changed:
            self.reply, self.error = reply, error
            self.done.set()
            self.changed.notify_all()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.reply


class ReplyBatcher:
    """The one thread that runs the model. A request that finds it idle starts at
    once; requests that come while it is busy wait, then go together as one
    batch: at most max_batch of them, and at most max_tokens tokens counting every
    row at the longest prompt plus the reply (the key/value cache a batch holds).
    A batch that is not full waits up to max_wait seconds, from its oldest
    request, for messages announced as on their way, never for ones that may not
    come: so a lone message never waits."""

    def __init__(self, generate, max_batch, max_wait, max_tokens=None, reply_tokens=0):
        self.generate, self.max_batch, self.max_wait = generate, max_batch, max_wait
        self.max_tokens, self.reply_tokens = max_tokens, reply_tokens
        self.pending = deque()
        self.coming = 0           # announced and not yet submitted or withdrawn
        self.closing = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="model", daemon=True)
        self.thread.start()

    def announce(self):
        """A message that may need the model is on its way to a worker."""
        with self.changed:
            self.coming += 1

    def withdraw(self):
        """...and it did not need it (a command, an error): nobody should wait for it."""
        with self.changed:
            self.coming -= 1
            self.changed.notify_all()

    def submit(self, prompt, tokens=0, announced=False, stream=False, prompt_text=None):
        request = ReplyRequest(prompt, tokens, stream, prompt_text)
        with self.changed:
            self.coming -= bool(announced)
            self.pending.append(request)
            self.changed.notify_all()
        return request

    def reply(self, prompt, tokens=0):
        return self.submit(prompt, tokens).result()

    def _fitting(self):
        """How many of the pending requests, oldest first, the next batch can take."""
        count, longest = 0, 0
        for request in self.pending:
            longest = max(longest, request.tokens + self.reply_tokens)
            if count == self.max_batch or (count and self.max_tokens and (count + 1) * longest > self.max_tokens):
                break
            count += 1
        return count

    def _next_batch(self):
        with self.changed:
            self.changed.wait_for(lambda: self.pending or self.closing)
            if not self.pending:
                return None
            deadline = self.pending[0].arrived + self.max_wait
            while self._fitting() == len(self.pending) < self.max_batch and self.coming > 0 and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            return [self.pending.popleft() for _ in range(self._fitting())]

    def _run(self):
        while (batch := self._next_batch()) is not None:
            try:
                # Each streamed row hands its text to its own request, so to its own chat.
                replies = self.generate([request.prompt for request in batch],
                                        [request.show if request.stream else None for request in batch])
                replies = list(zip(batch, replies, strict=True))
            except Exception as error:  # every waiting worker answers its chat with an apology
                replies = [(request, error) for request in batch]
            for request, reply in replies:
                if isinstance(reply, Exception):
                    request.finish(error=reply)
                else:
                    request.finish(reply)

    def close(self):
        """Finish what is queued, then stop the thread."""
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.thread.join()


class ServerReplies:
    """The replies from an inference server instead of the model thread (--server): each
    request is sent, streamed, from a pool of threads as large as the bot's workers, and the
    server batches (vLLM) or queues (transformers serve) them. The same interface as
    ReplyBatcher, so a worker does not know which one answers."""

    def __init__(self, server, settings, threads):
        self.server, self.settings = server, settings
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="server")

    def announce(self):
        pass  # nothing waits for company: the server does its own batching

    def withdraw(self):
        pass

    def submit(self, prompt, tokens=0, announced=False, stream=False, prompt_text=None):
        request = ReplyRequest(prompt, tokens, stream, prompt_text)
        self.pool.submit(self._run, request)
        return request

    def _run(self, request):
        try:
            request.finish(server_reply(self.server, self.settings, request.prompt,
                                        request.show if request.stream else None, request.prompt_text))
        except Exception as error:  # ServerError: the worker apologises to its chat
            request.finish(error=error)

    def close(self):
        self.pool.shutdown(wait=True)


def model_thread_generate(chat, settings, note=None):
    """generate(prompts, on_text) -> replies for the model thread, with its own tokenizer
    (the workers' copies are busy building prompts); on_text, one callable or None a prompt,
    gets that reply's visible text as it grows. note(format, *values), if given, hears of
    each batch (the bot's debug log)."""
    chat = dict(chat, tokenizer=copy.deepcopy(chat["tokenizer"]))

    def generate(prompts, on_text=None):
        start = time.monotonic()
        rows = generate_ids(chat, settings, prompts, on_text)
        if note is not None:
            note("batch of %d: %s new tokens in %.2f s", len(rows), ",".join(str(len(row)) for row in rows),
                 time.monotonic() - start)
        return [decode_reply(chat["tokenizer"], row) for row in rows]

    return generate
