package dev.tidemark.it;

import java.io.IOException;
import java.io.OutputStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.nio.file.StandardOpenOption;
import java.util.Collection;
import java.util.HashMap;
import java.util.Map;

import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.connect.data.ConnectSchema;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.json.JsonConverter;
import org.apache.kafka.connect.sink.SinkRecord;
import org.apache.kafka.connect.sink.SinkTask;

/**
 * Writes each record's key and value, as the worker's converters made them
 * (Connect schema and Java objects), back as JSON with Connect's own
 * {@code JsonConverter.fromConnectData} (schemas enabled), which renders every
 * Connect value exactly: doubles with all their digits, bytes as base64,
 * strings quoted, nested arrays and structs as such. One line per record:
 *
 * <pre>{"topic":..,"partition":..,"offset":..,"key":{"schema":..,"payload":..},"value":{..},"invalid":"why"}</pre>
 *
 * {@code invalid} is present only when a value does not fit its own schema
 * ({@code ConnectSchema.validateValue}) or cannot be written back.
 */
public class ExactSinkTask extends SinkTask {
    private OutputStream out;
    private final JsonConverter keys = new JsonConverter();
    private final JsonConverter values = new JsonConverter();

    @Override
    public String version() {
        return "0";
    }

    @Override
    public void start(Map<String, String> props) {
        Map<String, String> json = new HashMap<>();
        json.put("schemas.enable", "true");
        json.put("replace.null.with.default", "false");
        keys.configure(json, true);
        values.configure(json, false);
        try {
            out = Files.newOutputStream(Paths.get(props.get(ExactSinkConnector.FILE_CONFIG)),
                    StandardOpenOption.CREATE, StandardOpenOption.APPEND);
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    @Override
    public void put(Collection<SinkRecord> records) {
        StringBuilder lines = new StringBuilder();
        for (SinkRecord r : records) {
            StringBuilder invalid = new StringBuilder();
            lines.append("{\"topic\":").append(quote(r.topic()))
                    .append(",\"partition\":").append(r.kafkaPartition())
                    .append(",\"offset\":").append(r.kafkaOffset())
                    .append(",\"key\":").append(json(keys, r.topic(), r.keySchema(), r.key(), "key", invalid))
                    .append(",\"value\":").append(json(values, r.topic(), r.valueSchema(), r.value(), "value", invalid));
            if (invalid.length() > 0) {
                lines.append(",\"invalid\":").append(quote(invalid.toString()));
            }
            lines.append("}\n");
        }
        try {
            // Whole lines, at once: the test reads complete lines only.
            out.write(lines.toString().getBytes(StandardCharsets.UTF_8));
            out.flush();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    private static String json(JsonConverter converter, String topic, Schema schema, Object value,
            String what, StringBuilder invalid) {
        try {
            if (schema != null) {
                ConnectSchema.validateValue(schema, value);
            }
        } catch (RuntimeException e) {
            invalid.append(what).append(": ").append(e);
        }
        try {
            byte[] bytes = converter.fromConnectData(topic, schema, value);
            return bytes == null ? "null" : new String(bytes, StandardCharsets.UTF_8);
        } catch (RuntimeException e) {
            invalid.append(what).append(" cannot be written back: ").append(e);
            return "null";
        }
    }

    private static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '"' || c == '\\') {
                b.append('\\').append(c);
            } else if (c < 0x20) {
                b.append(String.format("\\u%04x", (int) c));
            } else {
                b.append(c);
            }
        }
        return b.append('"').toString();
    }

    @Override
    public void flush(Map<TopicPartition, OffsetAndMetadata> offsets) {
        try {
            out.flush();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    @Override
    public void stop() {
        try {
            if (out != null) {
                out.close();
            }
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }
}
