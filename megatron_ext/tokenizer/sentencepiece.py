"""SentencePiece models by Megatron-LM's three type names (EOD rules: ``megatron_ext.tokenizer``)."""

from typing import List, Sequence

from megatron_ext.tokenizer.base import Tokenizer


class GPTSentencePieceTokenizer(Tokenizer):
    # Each process tokenizes on one thread: preprocessing parallelises over processes.
    threads = 1
    add_bos = False  # whether `tokenize` starts a document with BOS

    def __init__(self, model_path: str):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"--tokenizer-model {model_path} is not a SentencePiece model: {e} "
                             "(a tokenizer.json or a saved HF directory is read by "
                             "--tokenizer-type HuggingFaceTokenizer)") from None
        self.vocab_size = self._sp.vocab_size()
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eod = self._eod_id(model_path)
        if self.add_bos and self.bos is None:
            # sentencepiece would fail on every document, each a skippable record error.
            raise ValueError(
                f"--tokenizer-model {model_path} has no BOS id (trained with bos_id=-1), so "
                f"{type(self).__name__} cannot start documents with BOS; use "
                "--tokenizer-type GPTSentencePieceTokenizer or a model with a BOS piece")

    def _eod_id(self, model_path: str) -> int:
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"--tokenizer-model {model_path} has no EOS id (trained with eos_id=-1), so "
                f"{type(self).__name__} has no EOD; use --tokenizer-type SentencePieceTokenizer "
                "(adds its own <EOD>) or a model with an EOS piece")
        return self._sp.eos_id()

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text, add_bos=self.add_bos)

    def tokenize_without_special_tokens(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts), add_bos=self.add_bos, num_threads=self.threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i < self._sp.vocab_size()])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's `_Llama2Tokenizer.tokenize(s, bos=True, eos=False)`, which its
    preprocess_data.py calls with the defaults: BOS, then the text's ids."""

    add_bos = True


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    def _eod_id(self, model_path: str) -> int:
        vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size())}

        def special(piece: str) -> int:
            if piece not in vocab:
                vocab[piece] = len(vocab)
            return vocab[piece]

        def piece_of(index: int, fallback: str) -> str:
            return self._sp.id_to_piece(index) if index >= 0 else fallback

        # Megatron's order of additions; it fixes the ids that missing pieces get.
        special("<CLS>")
        special("<SEP>")
        eod = special("<EOD>")
        special("<MASK>")
        self.pad = special(piece_of(self._sp.pad_id(), "<PAD>"))
        self.bos = special(piece_of(self._sp.bos_id(), "<BOS>"))
        self._eos = special(piece_of(self._sp.eos_id(), "<EOS>"))
        self.vocab_size = len(vocab)
        return eod

    @property
    def eos(self) -> int:
        return self._eos


