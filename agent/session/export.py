"""Exporting a checkpoint as an OCI image: fetch its chain, squash it, write a layout.

The image is the base's layers (when a base layout is given: the template image
the session ran on), hardlinked or copied, and on top the checkpoint's chain
squashed into one zstd layer.  The chain is always squashed, even a chain of one
layer: the squash reads every layer as the restore does (digests checked,
hostile entries refused), so the image carries nothing a restore would not
apply.  The squashed layer's whiteouts are OCI whiteouts, so a runtime applies
them over the base's layers as a restore applies them over the image.

The layer's digest and its diff_id (the digest of the uncompressed tar) are both
computed while it is written; nothing is read back.  The base and the target
directory are checked before anything is fetched; a failed export removes what
it wrote, and one killed half way leaves no ``index.json``, so no tool takes it
for an image.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from agent.checkpoint.manifest import A_STUDIO, LAYER_MEDIA_TYPE, CheckpointState, LayerDesc
from agent.checkpoint.merge import read_order
from agent.checkpoint.oci_layout import (
    BASE_DIGEST,
    CONFIG_MEDIA_TYPE,
    CREATED,
    REF_NAME,
    BaseImage,
    Descriptor,
    LayoutWriter,
    check_ref_name,
    encode,
    image_config,
    image_manifest,
    read_image,
    ref_name,
    this_platform,
)
from agent.checkpoint.restore import LayerFile
from agent.checkpoint.squash import SquashResult, squash_layers
from agent.errors import AgentError
from agent.log import get_logger
from agent.session.manifests import Manifests
from agent.session.records import CheckpointInfo, Progress, ProgressFn
from agent.settings import Settings
from agent.store.base import Store
from agent.store.fetch import Fetch

log = get_logger("session")

A_CHECKPOINT = "io.studio-agent.checkpoint"


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    checkpoint: CheckpointInfo
    directory: Path
    tag: str
    manifest: str  # the image manifest's digest
    config: str  # the image config's digest
    layer: Descriptor  # the squashed layer
    diff_id: str
    uncompressed: int
    squashed: int  # checkpoint layers squashed into it
    base_layers: int
    base: Path | None

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint.to_json(),
            "oci": str(self.directory),
            "tag": self.tag,
            "manifest": self.manifest,
            "config": self.config,
            "layer": {
                "digest": self.layer.digest,
                "size": self.layer.size,
                "diff_id": self.diff_id,
                "uncompressed": self.uncompressed,
            },
            "squashed": self.squashed,
            "base": None if self.base is None else str(self.base),
            "base_layers": self.base_layers,
        }


class Exporter:
    def __init__(self, settings: Settings, store: Store, spool: Path, manifests: Manifests) -> None:
        self._settings = settings
        self._store = store
        self._spool = spool
        self._manifests = manifests

    async def export(
        self,
        studio: str,
        name: str,
        directory: Path,
        *,
        base: Path | None = None,
        tag: str = "",
        progress: ProgressFn | None = None,
    ) -> ExportOutcome:
        """Write ``studio``/``name`` as an image to the new layout ``directory``,
        on ``base`` (an OCI layout of one image) when given; ``tag``: its
        ref.name there (default: the checkpoint's name, made a valid one)."""
        tag = check_ref_name(tag) if tag else ref_name(name)
        image = None if base is None else await asyncio.to_thread(read_image, base)
        info, manifest = await self._manifests.resolve(studio, name)
        if manifest.state is CheckpointState.INVALID:
            raise AgentError(f"checkpoint {studio}/{name} is marked invalid")
        writer = await asyncio.to_thread(LayoutWriter.create, directory)
        try:
            base_layers: list[Descriptor] = []
            if image is not None:
                base_layers = await asyncio.to_thread(self._copy_base, writer, image, progress)
            layer, diff_id, uncompressed = await self._squash(writer, manifest.layers, progress)
            digests = await asyncio.to_thread(
                self._finish, writer, info, image, base_layers, layer, diff_id, tag
            )
        except BaseException:
            writer.discard()  # not awaited: an interrupted export cleans up all the same
            raise
        outcome = ExportOutcome(
            info,
            directory,
            tag,
            digests[0],
            digests[1],
            layer,
            diff_id,
            uncompressed,
            len(manifest.layers),
            len(base_layers),
            base,
        )
        log.info(
            "checkpoint.exported",
            checkpoint=f"{studio}/{name}",
            oci=str(directory),
            tag=tag,
            manifest=outcome.manifest,
            layers=len(manifest.layers),
            base_layers=len(base_layers),
            size=layer.size,
        )
        return outcome

    @staticmethod
    def _copy_base(
        writer: LayoutWriter, image: BaseImage, progress: ProgressFn | None
    ) -> list[Descriptor]:
        total = sum(x.size for x in image.layers)
        done = 0
        for desc, path in zip(image.layers, image.files, strict=True):

            def on_copy(n: int, _size: int, before: int = done) -> None:
                if progress is not None:
                    progress(Progress("copy", before + n, total, 0, 0))

            writer.put_file(path, desc, on_copy)
            done += desc.size
        return list(image.layers)

    async def _squash(
        self, writer: LayoutWriter, layers: Sequence[LayerDesc], progress: ProgressFn | None
    ) -> tuple[Descriptor, str, int]:
        """The chain fetched (newest first, each verified as it is read) and
        squashed into the layout; its descriptor, diff_id and tar size."""
        blobs = [(x.digest, x.size) for x in layers]
        continues = [x.continues for x in layers]
        order = read_order(len(layers), continues)
        cancel = threading.Event()

        def on_fetched(done: int, total: int) -> None:
            if progress is not None:
                progress(Progress("download", done, total, 0, 0))

        def on_squash(done: int, total: int) -> None:
            if progress is not None:
                progress(Progress("squash", done, total, 0, 0))

        async with Fetch(
            self._store, blobs, self._spool, progress=on_fetched, order=order
        ) as fetch:

            def get(index: int) -> LayerFile:
                # The store verified the blob before handing it out.
                return LayerFile(fetch.wait_complete(index), size=layers[index].size)

            def run() -> tuple[Descriptor, str, int]:
                with writer.layer() as sink:
                    result: SquashResult = squash_layers(
                        len(layers),
                        sink.as_file(),
                        get,
                        level=self._settings.compression_level,
                        threads=self._settings.compression_threads,
                        cancel=cancel,
                        progress=on_squash,
                        total_bytes=sum(x.uncompressed for x in layers),
                        continues=continues,
                    )
                    r = result.layer
                    if (sink.digest, sink.size, sink.uncompressed) != (
                        r.digest,
                        r.size,
                        r.uncompressed,
                    ):
                        raise AgentError("the squashed layer's bytes differ from what was written")
                return Descriptor(LAYER_MEDIA_TYPE, r.digest, r.size), sink.diff_id, r.uncompressed

            try:
                return await asyncio.to_thread(run)
            except OSError as e:
                raise AgentError(
                    f"cannot write the layer to {writer.root}: {e.strerror or e}"
                ) from e
            finally:
                cancel.set()  # an export interrupted here stops its squash too

    @staticmethod
    def _finish(
        writer: LayoutWriter,
        info: CheckpointInfo,
        image: BaseImage | None,
        base_layers: Sequence[Descriptor],
        layer: Descriptor,
        diff_id: str,
        tag: str,
    ) -> tuple[str, str]:
        """Config, manifest, then index.json; the manifest's and config's digests."""
        label = f"{info.studio}/{info.name}"
        created = info.updated.astimezone(UTC).isoformat().replace("+00:00", "Z")
        platform = this_platform() if image is None else image.platform
        history = {
            "created_by": f"studio-agent export {label}",
            "comment": f"checkpoint {label}: {info.layers} layers squashed into one",
        }
        config = image_config(
            None if image is None else image.config, platform, diff_id, created, history
        )
        config_desc = writer.put_bytes(encode(config)[0], CONFIG_MEDIA_TYPE)
        annotations = {CREATED: created, A_STUDIO: info.studio, A_CHECKPOINT: info.name}
        if image is not None:
            annotations[BASE_DIGEST] = image.manifest.digest
        doc = image_manifest(config_desc, [*base_layers, layer], annotations)
        data, _ = encode(doc)
        manifest_desc = writer.put_bytes(data, doc["mediaType"])
        entry = Descriptor(
            manifest_desc.media_type,
            manifest_desc.digest,
            manifest_desc.size,
            {REF_NAME: tag},
            platform,
        )
        writer.finish([entry])
        return manifest_desc.digest, config_desc.digest


__all__ = ["ExportOutcome", "Exporter"]
