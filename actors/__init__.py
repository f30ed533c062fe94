"""A generic actor runtime on trio, with Erlang/OTP supervision.

Actors own private state and a bounded mailbox and handle one message at a time.
Supervisors start, restart and stop them. Everything is introspectable as data. The
runtime knows nothing about WebRTC. ``actors.bridge`` runs it as a guest on an asyncio
loop; ``Codec`` carries messages between processes.
"""

import logging as _logging

from ._actor import DEFAULT_ASK_TIMEOUT as DEFAULT_ASK_TIMEOUT
from ._actor import Actor as Actor
from ._actor import ActorRef as ActorRef
from ._actor import Down as Down
from ._actor import Monitor as Monitor
from ._actor import SupervisorRef as SupervisorRef
from ._actor import Trace as Trace
from ._actor import TracedMessage as TracedMessage
from ._codec import Codec as Codec
from ._errors import ActorCrashed as ActorCrashed
from ._errors import ActorError as ActorError
from ._errors import ActorStopped as ActorStopped
from ._errors import AskTimeout as AskTimeout
from ._errors import DecodeError as DecodeError
from ._errors import MailboxFull as MailboxFull
from ._errors import RestartIntensityExceeded as RestartIntensityExceeded
from ._exit import Exit as Exit
from ._exit import ExitKind as ExitKind
from ._exit import SYSTEM_SHUTDOWN as SYSTEM_SHUTDOWN
from ._exit import Failure as Failure
from ._mailbox import Overflow as Overflow
from ._restart import Backoff as Backoff
from ._restart import ChildSpec as ChildSpec
from ._restart import Restart as Restart
from ._restart import Strategy as Strategy
from ._restart import SupervisorFlags as SupervisorFlags
from ._snapshot import ActorActivity as ActorActivity
from ._snapshot import ActorSnapshot as ActorSnapshot
from ._snapshot import ActorState as ActorState
from ._snapshot import SupervisorInfo as SupervisorInfo
from ._supervisor import Supervisor as Supervisor
from ._system import ActorSystem as ActorSystem
from ._system import SystemStatistics as SystemStatistics
from ._system import open_system as open_system

# A library logs; the program that uses it decides where that goes (none: nowhere).
_logging.getLogger("actors").addHandler(_logging.NullHandler())
