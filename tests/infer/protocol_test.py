"""The server's protocol layer: what streaming holds back, stop strings and the content filter on text."""
from fmjax.infer import protocol


class Chars:
    """ids are code points."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def view(stop=(), blocklist=(), chat_reply=False):
    v = protocol.TextView(Chars(), stop, protocol.Blocklist(blocklist), None if chat_reply else ())
    return lambda text, final=False: v.read([ord(c) for c in text], final), v.safe_end


def test_streamed_text_holds_back_what_a_stop_string_or_blocked_term_may_still_become():
    read, safe_end = view(stop=("STOP",))
    assert read("a ST") == ("a ST", None) and safe_end("a ST") == 2 and safe_end("a \ufffd") == 2
    assert read("a bSTOP b") == ("a b", "stop")
    read, safe_end = view(blocklist=("bad word",))
    assert safe_end("ok bad wo") == 3 and safe_end("x y z") == 2  # a two-word term may start at the last two
    assert read("a bad word") == ("a bad word", None)  # it may become "wordy": wait
    assert read("a bad word.") == ("a ", "content_filter") and read("a Bad  Word", True) == ("a ", "content_filter")
    assert read("a bad wordy.") == ("a bad wordy.", None)
    read, safe_end = view(chat_reply=True)
    assert read("  hi  ") == ("hi  ", None) and safe_end("hi  ") == 2 and read("  hi  ", True) == ("hi", None)
