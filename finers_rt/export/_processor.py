"""A Qwen2.5-VL processor for images and text only (no video processor, so no torchvision)."""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor.

    Same `__call__` and `apply_chat_template` for image + text inputs; passing `videos` fails.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.video_processor = None
        super(Qwen2_5_VLProcessor, self).__init__(image_processor, tokenizer,
                                                  chat_template=chat_template)
