"""The web chat's page for tests: built by system_prompt.py's own build_page and served in this
process on a free port, with a stand-in for the model (test_web_chat.py, test_web_ratings.py)."""
import socket

import system_prompt


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loaded(folder, *flags):
    """(args, chat, settings) of `system_prompt.py --model folder --web *flags`, no weights read."""
    args = system_prompt.parse_args(["--model", str(folder), "--device", "cpu", "--web", *flags])
    system_prompt.check_args(args)
    chat = system_prompt.open_model_folder(args.model, args.device, need_weights=False)
    return args, chat, system_prompt.resolve_settings(args, chat)


class Page:
    """The page the script serves, its batcher calling `generate`; the ratings database of --db, if given."""

    def __init__(self, args, chat, settings, generate, max_batch=8):
        self.chats = system_prompt.WebChats(chat, settings, args, system_prompt.ReplyBatcher(generate, max_batch, 0.0),
                                            system_prompt.web_ratings(args, chat))
        title, lines = system_prompt.page_heading(args, chat, settings)
        self.page = system_prompt.build_page(self.chats, title, lines)
        _, self.url, _ = self.page.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                          quiet=True, ssr_mode=False)

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def like_listeners(self):
        chatbot = next(block for block in self.page.blocks.values() if type(block).__name__ == "Chatbot")
        return [fn for fn in self.page.fns.values() if (chatbot._id, "like") in [tuple(t) for t in fn.targets]]

    def close(self):
        self.page.close()
        self.chats.close()
