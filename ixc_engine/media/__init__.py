"""Media preprocessing: images (HD canvas, 560x560 crops) and videos (sampled frames stitched into a canvas)."""

from ixc_engine.media.errors import MediaError
from ixc_engine.media.image import MediaCrops, image_token_count, process_image
from ixc_engine.media.loader import MediaBytes, load_media, media_digest
from ixc_engine.media.video import VIDEO_EXTENSIONS, is_video_path, process_video

__all__ = [
           "VIDEO_EXTENSIONS",
           "MediaBytes",
           "MediaCrops",
           "MediaError",
           "image_token_count",
           "is_video_path",
           "load_media",
           "media_digest",
           "process_image",
           "process_video",
]
