"""Publishing an exported folder on the Hugging Face Hub."""

from convmodel.errors import UserError


class PushError(Exception):
    """The upload to the Hub failed after the folder was written (not a mistake in the arguments)."""


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"--push_to_hub {repo_id!r} is not a Hub repository name (NAME or ORG/NAME): {exc}") from exc
    return repo_id


def push_folder(folder: str, repo_id: str, private: bool, commit_message: str) -> str:
    """Create the Hub repository if needed and upload the folder; the URL of the commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    step = f"creating the repository {repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = f"uploading {folder} to {repo_id}"
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                   repo_type="model")
    except Exception as exc:  # network, auth, permissions: all end the same way for the user
        detail = " ".join(str(exc).split())[:500] or "no detail"
        retry = f"hf upload {repo_id} {folder} ." + (" --private" if private else "")
        raise PushError(
            f"--push_to_hub {repo_id}: the upload failed while {step} ({type(exc).__name__}: {detail}). The "
            f"exported model is complete in {folder}; check the network and your token (HF_TOKEN or "
            f"`hf auth login`), then upload it with `{retry}`") from exc
    return str(getattr(commit, "commit_url", None) or f"{api.endpoint}/{repo_id}")
