"""`llamaserve accounts|keys|credits ...`: manage the account store directly (the server need not run)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from llamaserve.billing.bootstrap import open_store
from llamaserve.billing.limits import PLANS
from llamaserve.billing.passwords import check_email, check_password, hash_password, normalize_email
from llamaserve.billing.pricing import format_credits, parse_credits
from llamaserve.billing.store import BalanceError, Store, StoreError
from llamaserve.config import PlatformConfig, default_data_dir

T = TypeVar("T")
console = Console()
DataDir = Annotated[Path | None, typer.Option(help="Data directory (default: $LLAMASERVE_HOME or ~/.llamaserve).")]
DatabaseUrl = Annotated[
    str | None, typer.Option(envvar="LLAMASERVE_DATABASE_URL", help="Database URL (default: SQLite in the data dir).")
]

accounts_app = typer.Typer(help="Accounts: create and list.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create, list, disable, enable, revoke.", no_args_is_help=True)
credits_app = typer.Typer(help="Credits: add and show the balance.", no_args_is_help=True)


def _run(data_dir: Path | None, database_url: str | None, action: Callable[[Store], Awaitable[T]]) -> T:
    config = PlatformConfig(data_dir=data_dir or default_data_dir(), database_url=database_url)

    async def run() -> T:
        store = await open_store(config.url, config.data_dir)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (StoreError, BalanceError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from e


def _plan(plan: str) -> str:
    if plan not in PLANS:
        raise typer.BadParameter(f"unknown plan {plan!r}; plans: {', '.join(PLANS)}")
    return plan


Email = Annotated[str | None, typer.Option(help="Dashboard login email (asks for a password).")]
PasswordStdin = Annotated[bool, typer.Option(help="Read the password from the first line of stdin (no prompt).")]


def _email(email: str | None) -> str | None:
    if email is None:
        return None
    email = normalize_email(email)
    if problem := check_email(email):
        raise typer.BadParameter(problem, param_hint="--email")
    return email


def _password_hash(password_stdin: bool) -> str:
    """Asks for the password (or reads it from stdin) and returns its argon2 hash; the password goes no further."""
    if password_stdin:
        password = typer.get_text_stream("stdin").readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if problem := check_password(password):
        console.print(f"[red]error:[/red] {problem}")
        raise typer.Exit(1)
    return hash_password(password)


@accounts_app.command("create")
def accounts_create(
    name: str,
    plan: Annotated[str, typer.Option(help=f"Rate-limit plan: {', '.join(PLANS)}.", callback=_plan)] = "free",
    credits: Annotated[str, typer.Option(help="Starting credits, e.g. 10 or 2.5.")] = "0",
    email: Email = None,
    admin: Annotated[bool, typer.Option(help="May use the dashboard's admin view (needs --email).")] = False,
    password_stdin: PasswordStdin = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an account; with --email it can log in to the dashboard."""
    amount = parse_credits(credits)
    login = _email(email)
    if admin and login is None:
        raise typer.BadParameter("an admin must be able to log in: give --email", param_hint="--admin")
    hashed = _password_hash(password_stdin) if login else None
    account = _run(
        data_dir,
        database_url,
        lambda s: s.create_account(name, plan, amount, email=login, password_hash=hashed, is_admin=admin),
    )
    console.print(f"account [bold]{account.name}[/bold] created (plan {plan}, {format_credits(amount)} credits)")


@accounts_app.command("set-login")
def accounts_set_login(
    name: str,
    email: Email = None,
    password: Annotated[bool, typer.Option(help="Set a new password (asks for it).")] = False,
    admin: Annotated[bool | None, typer.Option("--admin/--no-admin", help="Grant or take away admin.")] = None,
    password_stdin: PasswordStdin = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Give an account a dashboard login (email and password), a new password, or the admin flag."""
    login = _email(email)
    hashed = _password_hash(password_stdin) if login or password or password_stdin else None
    if login is None and hashed is None and admin is None:
        raise typer.BadParameter("nothing to change: give --email, --password or --admin/--no-admin")
    account = _run(
        data_dir,
        database_url,
        lambda s: s.update_account(name, email=login, password_hash=hashed, is_admin=admin),
    )
    role = "admin" if account.is_admin else "user"
    console.print(f"account [bold]{account.name}[/bold]: login {account.email or 'none'}, {role}")


@accounts_app.command("list")
def accounts_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """List accounts with plan, status and balance."""
    accounts = _run(data_dir, database_url, lambda s: s.list_accounts())
    table = Table("name", "plan", "status", "balance (credits)", "login", "admin")
    for a in accounts:
        table.add_row(a.name, a.plan, a.status, format_credits(a.balance), a.email or "", "yes" if a.is_admin else "")
    console.print(table)


@keys_app.command("create")
def keys_create(
    account: str,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    model: Annotated[list[str] | None, typer.Option(help="Allow only this model (repeatable).")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a key for an account; the key is shown once, here."""
    full, key = _run(data_dir, database_url, lambda s: s.create_key(account, name, model or None))
    console.print(f"key for [bold]{account}[/bold] (prefix {key.prefix}); store it now, it is not shown again:")
    print(full)


@keys_app.command("list")
def keys_list(
    account: Annotated[str | None, typer.Argument()] = None, data_dir: DataDir = None, database_url: DatabaseUrl = None
) -> None:
    """List keys (prefix only; secrets are never stored)."""
    keys = _run(data_dir, database_url, lambda s: s.list_keys(account))
    table = Table("prefix", "account", "name", "state", "models", "last used")
    for k, owner in keys:
        state = "revoked" if k.revoked else "enabled" if k.enabled else "disabled"
        models = ", ".join(k.allowed_models) if k.allowed_models else "all"
        table.add_row(f"ls-{k.prefix}_…", owner, k.name, state, models, str(k.last_used_at or "never"))
    console.print(table)


def _key_command(prefix: str, data_dir: Path | None, database_url: str | None, **change: bool) -> None:
    key = _run(data_dir, database_url, lambda s: s.set_key(prefix.removeprefix("ls-").split("_")[0], **change))
    state = "revoked" if key.revoked else "enabled" if key.enabled else "disabled"
    console.print(f"key ls-{key.prefix}_… is now {state}")


@keys_app.command("disable")
def keys_disable(prefix: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Disable a key (403 until enabled again)."""
    _key_command(prefix, data_dir, database_url, enabled=False)


@keys_app.command("enable")
def keys_enable(prefix: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Enable a disabled key."""
    _key_command(prefix, data_dir, database_url, enabled=True)


@keys_app.command("revoke")
def keys_revoke(prefix: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Revoke a key for good (401 from now on)."""
    _key_command(prefix, data_dir, database_url, revoked=True)


@credits_app.command("add")
def credits_add(
    account: str,
    amount: str,
    note: Annotated[str, typer.Option(help="Why, for the ledger.")] = "credits added",
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add credits to an account (a negative amount takes them away)."""
    balance = _run(data_dir, database_url, lambda s: s.grant(account, parse_credits(amount), note))
    console.print(f"{account}: balance {format_credits(balance)} credits")


@credits_app.command("balance")
def credits_balance(account: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Show an account's balance."""
    a = _run(data_dir, database_url, lambda s: s.account(account))
    console.print(f"{a.name}: balance {format_credits(a.balance)} credits")
