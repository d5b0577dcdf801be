"""The model artifact's store and loading: the versioned registry (publishing versions, exports and aliases,
resolving references, fetching with integrity checks) and loading model.keras in safe mode. What a version is (the
manifest, references, file names, model errors) is in core.manifest.

Layout under a store root (a folder or s3://bucket/prefix):
    {root}/{name}/{version}/model.keras
    {root}/{name}/{version}/manifest.json
    {root}/{name}/{version}/model.onnx          (the serving export, listed in manifest.exports)
    {root}/{name}/{version}/export.onnx.json    (its record, for an export added after publishing)
    {root}/{name}/aliases/{alias}.json      -> {"version": "..."}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.manifest import (
    EXPORT_KEYS,
    INT8_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ExportMissing,
    ModelError,
    ModelIntegrityError,
    ModelManifest,
    ModelNotFound,
    ModelRef,
    ServingExport,
    VersionExists,
    check_name,
    export_record_file,
    parse_ref,
    sha256_file,
)
from core.settings import Settings, get_settings
from core.storage import AlreadyExists, ObjectNotFound, ObjectStore, join_uri, store_for

log = logging.getLogger(__name__)


class Registry:
    """Versioned models under one store root (local folder or s3:// prefix)."""

    def __init__(self, root: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.root = (root or self.settings.model_store).rstrip("/")
        self.store: ObjectStore = store_for(self.root, self.settings)

    # -- publishing ---------------------------------------------------------------------------------
    def publish(
        self,
        model_file: Path,
        manifest: ModelManifest,
        pictures: Sequence[Path] = (),
        exports: Mapping[str, Path] | None = None,
    ) -> str:
        """Upload model.keras, the serving exports, the report pictures and manifest.json as a new immutable
        version; return `name:version`. Each picture must be listed by file name in manifest.report_pictures, each
        export under its key in manifest.exports with its sha256."""
        check_name(manifest.name, manifest.ref)
        digest = sha256_file(model_file)
        if manifest.sha256 != digest:
            raise ModelIntegrityError(
                f"manifest sha256 {manifest.sha256[:12]}... does not match {model_file} ({digest[:12]}...)"
            )
        exports = dict(exports or {})
        unlisted = set(exports) - set(manifest.exports)
        if unlisted:
            raise ModelError(f"exports {', '.join(sorted(unlisted))} are not listed in the manifest's exports")
        if set(manifest.exports) - set(exports):
            # A manifest republished with model.keras alone (copied from another store): the version holds only the
            # files given, and its manifest lists only those.
            log.info("%s: publishing without the exports whose files were not given", manifest.ref)
            manifest = manifest.model_copy(
                update={"exports": {k: v for k, v in manifest.exports.items() if k in exports}}
            )
        for key, path in exports.items():
            _check_export_file(path, manifest.exports[key])
        vdir = self.version_uri(manifest.name, manifest.version)
        manifest_uri = join_uri(vdir, MANIFEST_FILE)
        if self.store.exists(manifest_uri):
            raise VersionExists(
                f"{manifest.ref} already exists in {self.root}: versions are immutable; publish a new version"
            )
        try:
            self.store.upload(model_file, join_uri(vdir, MODEL_FILE), overwrite=False)
            for key, path in exports.items():
                self.store.upload(path, join_uri(vdir, manifest.exports[key].file), overwrite=False)
            for picture in pictures:
                if picture.name not in manifest.report_pictures or picture.name in (MODEL_FILE, MANIFEST_FILE):
                    raise ModelError(f"{picture.name}: a published picture must be listed in report_pictures")
                self.store.upload(picture, join_uri(vdir, picture.name), overwrite=False)
            # The manifest is written last: a version without one is incomplete and never resolves.
            self.store.write_bytes(manifest_uri, manifest.model_dump_json(indent=2).encode(), overwrite=False)
        except AlreadyExists as exc:
            raise VersionExists(
                f"{manifest.ref} already exists in {self.root}: versions are immutable; publish a new version"
            ) from exc
        log.info("published %s to %s", manifest.ref, vdir)
        return manifest.ref

    def publish_export(self, ref: str | ModelRef, key: str, path: Path, record: ServingExport) -> ModelManifest:
        """Add a serving export to a published version that has none under `key`: the file, then its record
        (export.KEY.json), both written once; the version's manifest.json is never rewritten. Returns the manifest
        as it now resolves (with the export)."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        manifest, vdir = self._resolve(parsed)
        if key in manifest.exports:
            raise VersionExists(
                f"{manifest.ref} already has a {key} export ({manifest.exports[key].file}); versions are immutable"
            )
        _check_export_file(path, record)
        store = self._store_of(join_uri(vdir, MANIFEST_FILE))
        file_uri = join_uri(vdir, record.file)
        try:
            store.upload(path, file_uri, overwrite=False)
        except AlreadyExists as exc:
            raise ModelError(
                f"{file_uri} exists but has no record ({export_record_file(key)}): an earlier export was cut short; "
                "remove that file from the store and export again"
            ) from exc
        try:
            store.write_bytes(
                join_uri(vdir, export_record_file(key)), record.model_dump_json(indent=2).encode(), overwrite=False
            )
        except AlreadyExists as exc:
            raise VersionExists(f"{manifest.ref} already has a {key} export; versions are immutable") from exc
        log.info("published the %s export of %s to %s", key, manifest.ref, vdir)
        return manifest.model_copy(update={"exports": {**manifest.exports, key: record}})

    def promote(self, ref: str, alias: str) -> ModelManifest:
        """Point `name@alias` at the version that `ref` resolves to."""
        manifest = self.resolve(ref)
        check_name(alias, f"{manifest.name}@{alias}", what="alias")
        body = json.dumps({"version": manifest.version, "promoted_at": datetime.now(UTC).isoformat()})
        self.store.write_bytes(self.alias_uri(manifest.name, alias), body.encode(), overwrite=True)
        return manifest

    # -- reading ------------------------------------------------------------------------------------
    def version_uri(self, name: str, version: str) -> str:
        """The folder URI of one version."""
        return join_uri(self.root, name, version)

    def alias_uri(self, name: str, alias: str) -> str:
        """The URI of an alias file."""
        return join_uri(self.root, name, "aliases", f"{alias}.json")

    def versions(self, name: str) -> list[str]:
        """Complete versions of a model (those with a manifest), oldest first."""
        prefix = join_uri(self.root, name) + "/"
        found = set()
        for uri in self.store.list(prefix, suffixes=(MANIFEST_FILE,)):
            rest = uri[len(prefix) :].split("/")
            if len(rest) == 2 and rest[1] == MANIFEST_FILE and rest[0] != "aliases":
                found.add(rest[0])
        return sorted(found)

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version for one model."""
        prefix = join_uri(self.root, name, "aliases") + "/"
        out = {}
        for uri in self.store.list(prefix, suffixes=(".json",)):
            alias = uri[len(prefix) :].removesuffix(".json")
            out[alias] = json.loads(self.store.read_bytes(uri))["version"]
        return out

    def list(self) -> list[ModelManifest]:
        """Every complete version in the store, by name then version."""
        out = []
        for uri in self.store.list(self.root + "/", suffixes=(MANIFEST_FILE,)):
            rest = uri[len(self.root) + 1 :].split("/")
            if len(rest) == 3 and rest[1] != "aliases":
                out.append(self._read_manifest(uri))
        return sorted(out, key=lambda m: (m.name, m.version))

    def resolve(self, ref: str | ModelRef) -> ModelManifest:
        """The manifest a reference points at (name alone means the newest version), with the exports added to the
        version after it was published."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        return self._resolve(parsed)[0]

    def _resolve(self, parsed: ModelRef) -> tuple[ModelManifest, str]:
        """The manifest (late exports merged in) and the version's folder URI."""
        if parsed.uri:
            manifest = self._read_manifest(join_uri(parsed.uri, MANIFEST_FILE))
            return self._with_late_exports(manifest, parsed.uri), parsed.uri
        manifest = self._resolve_named(parsed)
        vdir = self.version_uri(manifest.name, manifest.version)
        return self._with_late_exports(manifest, vdir), vdir

    def _with_late_exports(self, manifest: ModelManifest, vdir: str) -> ModelManifest:
        """The manifest with the records of the exports published beside the version after it (if any)."""
        exports = dict(manifest.exports)
        for key in EXPORT_KEYS:
            if key in exports:
                continue
            uri = join_uri(vdir, export_record_file(key))
            try:
                raw = self._store_of(uri).read_bytes(uri)
            except ObjectNotFound:
                continue
            try:
                exports[key] = ServingExport.model_validate_json(raw)
            except ValidationError as exc:
                raise ModelError(f"{uri} is not a valid export record: {exc.errors()[0]['msg']}") from exc
        return manifest if exports == manifest.exports else manifest.model_copy(update={"exports": exports})

    def _resolve_named(self, parsed: ModelRef) -> ModelManifest:
        assert parsed.name is not None
        version = parsed.version
        if parsed.alias:
            try:
                body = self.store.read_bytes(self.alias_uri(parsed.name, parsed.alias))
            except ObjectNotFound as exc:
                raise ModelNotFound(
                    f"no alias {parsed} in {self.root}; see `allscore models list` or "
                    f"`allscore models promote {parsed.name}:VERSION {parsed.alias}`"
                ) from exc
            version = json.loads(body)["version"]
        if version is None:
            versions = self.versions(parsed.name)
            if not versions:
                raise ModelNotFound(f"no model named {parsed.name!r} in {self.root}; see `allscore models list`")
            version = versions[-1]
        return self._read_manifest(join_uri(self.version_uri(parsed.name, version), MANIFEST_FILE))

    def model_uri(self, ref: str | ModelRef) -> tuple[str, ModelManifest]:
        """The URI of model.keras and its manifest."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        manifest, vdir = self._resolve(parsed)
        return join_uri(vdir, MODEL_FILE), manifest

    def fetch(self, ref: str | ModelRef, cache_dir: Path | None = None) -> tuple[Path, ModelManifest]:
        """Download model.keras into the local cache (once) and check its sha256; return path and manifest."""
        uri, manifest = self.model_uri(ref)
        local = (cache_dir or self.settings.cache_dir) / manifest.name / manifest.version / MODEL_FILE
        self._download_checked(uri, local, manifest.sha256)
        return local, manifest

    def fetch_export(
        self, ref: str | ModelRef, key: str = "onnx", cache_dir: Path | None = None
    ) -> tuple[Path, ModelManifest]:
        """Download the version's `key` export into the local cache (once) and check its sha256; ExportMissing,
        with the command that makes one, if the version has none."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        manifest, vdir = self._resolve(parsed)
        record = manifest.exports.get(key)
        if record is None:
            store = "" if self.root == self.settings.model_store.rstrip("/") else f" --store {self.root}"
            if key == "onnx-int8":
                raise ExportMissing(
                    f"{manifest.ref} has no int8 export ({INT8_FILE}), which ALLSCORE_PRECISION=int8 serves: run "
                    f"`allscore models export {manifest.ref} --int8{store}` where TensorFlow is installed (it is "
                    "published only if it holds weighted F1), or serve this version in float32"
                )
            raise ExportMissing(
                f"{manifest.ref} has no {key} export (model.onnx), which ALLSCORE_RUNTIME=onnxruntime serves: run "
                f"`allscore models export {manifest.ref}{store}` where TensorFlow is installed, or serve this "
                "version with ALLSCORE_RUNTIME=tensorflow"
            )
        local = (cache_dir or self.settings.cache_dir) / manifest.name / manifest.version / record.file
        self._download_checked(join_uri(vdir, record.file), local, record.sha256)
        return local, manifest

    def _download_checked(self, uri: str, local: Path, sha256: str) -> None:
        """Download uri to local unless the cached copy matches sha256; refuse a file that does not match it."""
        if not (local.exists() and sha256_file(local) == sha256):
            local.parent.mkdir(parents=True, exist_ok=True)
            self._store_of(uri).download(uri, local)
        digest = sha256_file(local)
        if digest != sha256:
            local.unlink(missing_ok=True)
            raise ModelIntegrityError(
                f"{uri}: sha256 {digest[:16]}... does not match the manifest ({sha256[:16]}...); "
                "the file is corrupt or was swapped: republish the model as a new version"
            )

    def _store_of(self, uri: str) -> ObjectStore:
        """This registry's store for its own objects; a reference by URI may point at another store."""
        if uri.startswith(self.root + "/"):
            return self.store
        return store_for(uri, self.settings)

    def _read_manifest(self, uri: str) -> ModelManifest:
        try:
            raw = self._store_of(uri).read_bytes(uri)
        except ObjectNotFound as exc:
            raise ModelNotFound(f"no model manifest at {uri}; see `allscore models list`") from exc
        try:
            return ModelManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ModelError(f"{uri} is not a valid allscore manifest: {exc.errors()[0]['msg']}") from exc


def _check_export_file(path: Path, record: ServingExport) -> None:
    """An export file must match its record's sha256 and have passed its check against model.keras."""
    digest = sha256_file(path)
    if digest != record.sha256:
        raise ModelIntegrityError(f"export sha256 {record.sha256[:12]}... does not match {path} ({digest[:12]}...)")
    if record.wf1_gate is not None:
        if record.wf1_delta is None or not abs(record.wf1_delta) <= record.wf1_gate:
            raise ModelError(
                f"{record.file} moved held-out weighted F1 by {record.wf1_delta} (gate {record.wf1_gate}): "
                "not published"
            )
    elif record.tolerance is None or not record.max_abs_diff <= record.tolerance:
        raise ModelError(
            f"{record.file} differs from model.keras by {record.max_abs_diff:.3g} > {record.tolerance}: not published"
        )


@dataclass
class LoadedModel:
    """A Keras model in memory with the manifest it was published with."""

    model: Any
    manifest: ModelManifest
    path: Path


def load_keras(path: Path) -> Any:
    """Load a .keras file with Keras safe mode on (no arbitrary code from Lambda layers)."""
    import keras  # imported here: TensorFlow is slow to import and not fork-safe

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        raise ModelError(
            f"{path}: Keras refused to load the model ({exc}); models with Lambda layers or custom code "
            "are not accepted: retrain with the built-in architectures"
        ) from exc


def load_model(ref: str, *, store: str | None = None, settings: Settings | None = None) -> LoadedModel:
    """Resolve a reference, fetch and verify model.keras, and load it in safe mode."""
    registry = Registry(store, settings)
    path, manifest = registry.fetch(ref)
    return LoadedModel(model=load_keras(path), manifest=manifest, path=path)
